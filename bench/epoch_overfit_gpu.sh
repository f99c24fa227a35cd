# Small repositories trained for many epochs, to see the held-out loss turn up (overfitting), on the device:
#   bash bench/epoch_overfit_gpu.sh "tqdm:1,2,3,4,6,8,12" "requests:1,2,3,4,6,8"
# Each argument is PACKAGE:EPOCH-COUNTS, a package of the installed site-packages; each count is its own
# `elite-tui run` (bench/epoch_recommendation.py train), appended to $OUT/overfit.jsonl as it ends, and the loop stops
# starting runs near the call's 10 minutes. Scored with
#   python bench/epoch_recommendation.py score --from-fixture tests/data/epoch-overfit-runs.jsonl \
#       --out bench/results/epochs-overfit-gpu
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
D=/opt/torch/.venv/lib/python3.12/site-packages
# The candidates' Python source in bytes (one byte is one token of the demo's tokenizer): about 30 KB per update.
for p in packaging filelock markupsafe jinja2 idna certifi urllib3 requests charset_normalizer fsspec yaml tqdm psutil \
         safetensors mpmath pynvml click rich pygments attr; do
  [ -d $D/$p ] && echo "$p $(find $D/$p -name '*.py' -printf '%s\n' | awk '{s+=$1} END {print s}')"
done | sort -k2 -n | tee $OUT/sizes.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
for spec in "$@"; do
  R=${spec%%:*}; E=${spec#*:}
  left=$(( 570 - ($(date +%s) - start) ))
  [ $left -lt 40 ] && break
  # Compiled layers only cost start-up time here (about 35 s a run, most of it setup), not the losses' course.
  timeout $left python3 bench/epoch_recommendation.py train --repo $D/$R --label overfit-$R --tier 2 --seed 1 \
    --epochs ${E//,/ } --eval-every 2 --runs-dir /tmp/ep --fixture $OUT/overfit.jsonl --set compile_layers=off
done
echo done after $(( $(date +%s) - start )) s
