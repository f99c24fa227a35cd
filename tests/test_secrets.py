"""Planted secrets of each kind never reach the token files; the summary names path and rule, never the secret."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from elite_core.dataset import build_dataset, format_summary
from elite_core.demo_model import demo_tokenizer
from elite_core.secret_filter import SecretScanner, looks_like_credential, secret_file_name_rule

# Split so that this test file itself carries no detectable secret.
PRIVATE_KEY_BODY = "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0"
PRIVATE_KEY = "-----BEGIN RSA " + "PRIVATE KEY-----\n" + PRIVATE_KEY_BODY + "\n-----END RSA " + "PRIVATE KEY-----\n"
AWS_KEY = "AKIA" + "Z3MHQ7RT2XW4PB5N"
GITHUB_TOKEN = "ghp_" + "R8x2Lm4Qp9Tz6Wv3Yb7Nc1Kd5Hf0Gj8Sa2Ue"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9" + "." + "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkphbmUifQ" + "."
       + "Qm9ndXNTaWduYXR1cmVGb3JUZXN0cw")
API_KEY = "Zx9Qm2Lp8Rt4" + "Vw6Yb1Nc3Kd5Hf7Gj0S"
ENV_PASSWORD = "hunter2-" + "Pr0duction-Passw0rd"
SSH_KEY_BODY = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZWQy"

PLANTED = {
    "src/keys.py": (f'KEY = """\n{PRIVATE_KEY}"""\n', "private key (detect-secrets: PrivateKeyDetector)"),
    "src/aws.py": (f'client = make_client(access_key_id="{AWS_KEY}")\n', "aws access key (detect-secrets: AWSKeyDetector)"),
    "scripts/deploy.sh": (f"git clone https://x:{GITHUB_TOKEN}@github.com/org/repo\n",
                          "github token (detect-secrets: GitHubTokenDetector)"),
    "web/auth.js": (f'const session = "{JWT}";\n', "json web token (detect-secrets: JwtTokenDetector)"),
    "src/settings.py": (f'api_key = "{API_KEY}"\n', "secret keyword (detect-secrets: KeywordDetector)"),
    ".env": (f"DATABASE_PASSWORD={ENV_PASSWORD}\n", "file name: environment file (.env*)"),
    ".env.production": (f"TOKEN={ENV_PASSWORD}\n", "file name: environment file (.env*)"),
    "deploy/id_rsa": (f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SSH_KEY_BODY}\n", "file name: SSH private key (id_rsa*)"),
    "certs/server.pem": ("-----BEGIN CERTIFICATE-----\nMIIB\n", "file name: certificate or key file (*.pem)"),
}
SECRET_FRAGMENTS = [PRIVATE_KEY_BODY, AWS_KEY, GITHUB_TOKEN, JWT.split(".")[0], API_KEY, ENV_PASSWORD, SSH_KEY_BODY]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for relative, (content, _) in PLANTED.items():
        path = repo / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    (repo / "deploy" / "id_rsa.pub").write_text("ssh-ed25519 AAAAC3Nza public half\n", encoding="utf-8")
    for index in range(6):
        (repo / "src" / f"clean_{index}.py").write_text(f"def f{index}(x):\n    return x * {index}\n", encoding="utf-8")
    dataset_dir = tmp_path_factory.mktemp("dataset")
    summary = build_dataset(repo, dataset_dir, workers=1, eval_fraction=0.2)
    return repo, dataset_dir, summary


def decoded_streams(dataset_dir: Path) -> str:
    tokenizer = demo_tokenizer()
    texts = []
    for split in ("train", "eval"):
        ids = np.fromfile(dataset_dir / f"{split}.tokens", dtype="<u4")
        texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=False))
    return "\n".join(texts)


def test_each_planted_secret_is_excluded_with_its_rule(built):
    _, _, summary = built
    excluded = {item.path: item.reason for item in summary.secrets_excluded}
    for relative, (_, rule) in PLANTED.items():
        assert relative in excluded, relative
        assert excluded[relative].startswith(f"secret: {rule}"), (relative, excluded[relative])
    assert excluded["src/keys.py"] == "secret: private key (detect-secrets: PrivateKeyDetector), line 2"
    assert "deploy/id_rsa.pub" not in excluded


def test_no_secret_byte_reaches_the_token_files(built):
    _, dataset_dir, summary = built
    text = decoded_streams(dataset_dir)
    assert "def f0(x)" in text and summary.files == 7
    for fragment in SECRET_FRAGMENTS:
        assert fragment not in text
        assert fragment[:12] not in text
    raw = b"".join((dataset_dir / f"{split}.tokens").read_bytes() for split in ("train", "eval"))
    # The demo tokenizer is byte-level: a secret's bytes would show up as a run of ids.
    ids = np.frombuffer(raw, dtype="<u4")
    encoded = demo_tokenizer()(AWS_KEY, add_special_tokens=False)["input_ids"]
    assert np.array(encoded, dtype="<u4").tobytes() not in ids.tobytes()


def test_summary_and_manifest_never_hold_the_secret(built):
    _, dataset_dir, summary = built
    printed = format_summary(summary)
    manifest = (dataset_dir / "manifest.json").read_text(encoding="ascii")
    assert "src/aws.py" in printed and "AWSKeyDetector" in printed
    for fragment in SECRET_FRAGMENTS:
        assert fragment not in printed
        assert fragment not in manifest
    files = {entry["path"]: entry for entry in json.loads(manifest)["files"]}
    assert files["src/aws.py"]["status"] == "secret"


def test_file_name_rules():
    assert secret_file_name_rule("a/.env.local").rule == "file name: environment file (.env*)"
    assert secret_file_name_rule("home/.aws/config").rule.endswith("(.aws/)")
    assert secret_file_name_rule("keys/id_ed25519").rule == "file name: SSH private key (id_ed25519*)"
    assert secret_file_name_rule("keys/id_ed25519.pub") is None
    assert secret_file_name_rule("src/environment.py") is None


def test_keyword_rule_ignores_code_and_placeholders():
    scanner = SecretScanner()
    assert scanner.scan('password = "your-password-here"\n') is None
    assert scanner.scan("password = self.password\n") is None
    assert scanner.scan('secret = get_secret("name")\n') is None
    assert scanner.scan(f'DB_PASSWORD = "{API_KEY}"\n').line_number == 1
    assert not looks_like_credential("settings.SECRET_KEY")
    assert looks_like_credential(API_KEY)


def test_a_later_line_is_found_after_a_hit_that_spans_lines():
    scanner = SecretScanner()
    text = "x = 1\n" * 50 + f"token = '{GITHUB_TOKEN}'\n"
    assert scanner.scan(text).line_number == 51


def _gate_samples() -> dict[str, str]:
    """One planted value per gated detector pattern, assembled so that this file carries none of them."""
    alnum = "Q7w2E9r4T1y6U3i8O5p0A2s7D4f9G1h6J3k8L5z0X2c7V4b9N1m6"
    return {
        "aws secret": 'aws_secret_key = "' + alnum[:40] + '"\n',
        "aws secret, long s": 'AW\u017f_KEY = "' + alnum[:40] + '"\n',
        "aws access key": "key = '" + "ASIA" + "Z3MHQ7RT2XW4PB5N" + "'\n",
        "slack token": "token = '" + "xoxb-" + "1234567890-0987654321-abcdefghij0123" + "'\n",
        "slack webhook": "url = '" + "https://hooks.slack.com" + "/services/T0123ABCD/B0123ABCD/" + alnum[:24] + "'\n",
        "stripe": "key = '" + "sk_" + "live_" + alnum[:24] + "'\n",
        "mailchimp": "key = '" + alnum.lower()[:32] + "-us" + "12'\n",
        "discord": "token = '" + "M" + alnum[:24] + "." + alnum[24:30] + "." + alnum[:27] + "'\n",
        "telegram": "token = '" + "123456789" + ":" + alnum[:35] + "'\n",
        "openai": "key = '" + "sk-" + alnum[:20] + "T3Blbk" + "FJ" + alnum[20:40] + "'\n",
        "npm": "//registry.npmjs.org/" + ":_authToken=" + "npm_" + alnum[:36] + "\n",
        "github": "token = '" + "gho_" + alnum[:36] + "'\n",
        "gitlab": "token = '" + "glpat-" + alnum[:24] + "'\n",
    }


def test_pattern_gates_never_hide_a_finding():
    gated = SecretScanner()
    ungated = SecretScanner()
    ungated._detectors = [(plugin, [(pattern, None) for pattern, _ in prefilters]) for plugin, prefilters in ungated._detectors]
    assert sum(gate is not None for _, prefilters in gated._detectors for _, gate in prefilters) >= 10
    filler = "def f(x):\n    return {'a': x}  # d\u00e9j\u00e0 vu\n" * 20
    for name, sample in _gate_samples().items():
        ascii_filler = filler.encode("ascii", "ignore").decode("ascii")
        for text in (sample, filler + sample + filler, ascii_filler + sample):
            expected = ungated.scan(text)
            assert expected is not None, name
            assert gated.scan(text) == expected, name


# Split like the secrets above so that this file's own lines do not match.
UNQUOTED_PASSWORD = "hX9k2LmQ" + "7vRt4ZpW"


@pytest.mark.parametrize("relative, text", [
    ("config.yaml", f"database:\n  password: {UNQUOTED_PASSWORD}\n"),
    ("settings.ini", f"[db]\npassword = {UNQUOTED_PASSWORD}\n"),
    ("app.properties", f"spring.datasource.password={UNQUOTED_PASSWORD}\n"),
    ("scripts/start.sh", f"export DB_PASSWORD={UNQUOTED_PASSWORD}\n"),
    ("train_upload.py", f'HF_TOKEN = "{UNQUOTED_PASSWORD}"\n'),
    ("config/oauth.json", f'{{"refresh_token": "{UNQUOTED_PASSWORD}"}}\n'),
    ("ci.yaml", f"env:\n  GITHUB_TOKEN: {UNQUOTED_PASSWORD}\n"),
    ("call.sh", f'curl -H "Authorization: Bearer {UNQUOTED_PASSWORD}" https://api\n'),
    ("db.py", 'DB_PASSWORD = "Tr0ub4dor' + '$3xKq9vLm"\n'),  # a "$" inside is not a template
    ("api.py", 'api_key = "8fK2pYoUr7' + 'Qx9Lm3Zt6W"\n'),  # nor is "your" inside a random key
    ("keys.txt", "-----BEGIN ENCRYPTED " + "PRIVATE KEY-----\nMIIFHzBJBgkqhkiG9w0BBQ0wPDAbBgkqhkiG9w0BBQwwDgQI\n"),
    ("deploy/key", "PuTTY-User-Key-" + "File-3: ssh-ed25519\nEncryption: none\n"),
    ("hub.sh", "push --token hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh\n"),
    ("gh.sh", "GH=github_pat_" + "11ABCDEFG0" * 8 + "12\n"),
    ("maps.js", "const key = 'AIza" + "SyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW';\n"),
    ("llm.sh", "export KEY=sk-ant-" + "api03-" + "aB1cD2eF3gH4iJ5kL6mN7oP8qR9sT0uV\n"),
])
def test_secrets_that_need_the_file_type_or_a_rule_of_our_own(relative, text):
    assert SecretScanner().scan(text, relative) is not None, relative


@pytest.mark.parametrize("relative, text", [
    ("model.py", "token = self._tokenizer.encode(text)[0]\n"),  # in code a bare value is an expression
    ("tokenize.py", 'TOKEN = "[a-zA-Z_][a-zA-Z0-9_-]*"\n'),  # a regex is not a token
    ("tok.py", 'entity_1_token = kwargs.pop("entity_token_1", entity_1_token)\n'),
    ("aws.json", '{"NextToken": "eyJOZXh0VG9rZW4iOiBudWxsfQ==", "ClientRequestToken": "a8ca07e4-61ec-4399-99f4"}\n'),
    ("tokenizer_config.json", '{"pad_token": "<|endoftext|>", "bos_token_id": 151643}\n'),
    ("ci.yaml", "token: ${{ secrets.GITHUB_TOKEN }}\n"),
    ("setup.cfg", "password = ${DB_PASSWORD}\n"),
    ("docs/arn.md", '"ARN": "arn:aws:secretsmanager:us-west-2:123456789012:secret:MyTestSecret-a1b2c3"\n'),
    ("docs/keys.md", '"SecurityToken": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"\n'),
    # a credentials variable that names a file, a route, handles named in camelCase
    ("Dockerfile", "ENV GOOGLE_APPLICATION_CREDENTIALS=/app/keys/service-account-1.json\n"),
    ("deploy.yaml", "token: /run/secrets/api-token-1\n"),
    ("client.py", 'DEFAULT_TOKEN = "oauth2/v1/token"\n'),
    ("logs.json", '{"nextForwardToken": "f/31961209122447488583055879464742346735121166569214640130"}\n'),
    ("catalog.json", '{"CopyProductToken": "copyproduct-abc5defgjkdji"}\n'),
])
def test_code_handles_and_placeholders_are_not_secrets(relative, text):
    assert SecretScanner().scan(text, relative) is None, relative


def test_more_secret_file_names():
    for name in (".envrc", ".env-production", ".env_local", ".secrets.toml", "infra/terraform.tfstate.backup",
                 "home/.ssh/keys/deploy_token"):
        assert secret_file_name_rule(name) is not None, name
    assert secret_file_name_rule("src/environment.py") is None
