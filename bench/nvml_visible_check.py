"""Does NVML report the GPU torch's cuda:N is, under each CUDA_VISIBLE_DEVICES form? Run on a GPU machine:
python3 bench/nvml_visible_check.py. Each setting runs in a fresh process (CUDA reads the variable once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, torch
from elite_core import nvml
ours = [{"uuid": d.uuid, "name": d.name, "free": d.free_bytes} for d in nvml.devices()]
cuda = []
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    free, total = torch.cuda.mem_get_info(i)
    cuda.append({"uuid": "GPU-" + str(p.uuid), "name": p.name, "free": free})
print(json.dumps({"ours": ours, "cuda": cuda}))
"""


def probe(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if env_value is not None:
        env["CUDA_VISIBLE_DEVICES"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    base = probe(None)
    uuids = [d["uuid"] for d in base.get("cuda", [])]
    settings: list[str | None] = [None, "0", "", "99"]
    if uuids:
        settings += [uuids[0], uuids[0][:12]]
    if len(uuids) > 1:
        settings += ["1", "1,0", uuids[1]]
    failures = 0
    print(f"{'CUDA_VISIBLE_DEVICES':<44} {'torch sees':>10} {'NVML sees':>10}  same GPUs, same order")
    for value in settings:
        result = probe(value)
        if "error" in result:
            print(f"{value!r:<44} error: {result['error']}")
            failures += 1
            continue
        same = [d["uuid"] for d in result["ours"]] == [d["uuid"] for d in result["cuda"]]
        failures += not same
        print(f"{value!r:<44} {len(result['cuda']):>10} {len(result['ours']):>10}  {'yes' if same else 'NO'}")
    print(f"{failures} setting(s) where NVML and torch disagree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
