"""Keep secrets out of the training set: by file name first, then by content through detect-secrets' detectors.

Findings name the path and the rule, never the secret itself.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath

from elite_core.repo_scan import language_of

# Matched against the lower-cased file name; the description is what the summary shows.
SECRET_FILE_NAME_RULES: tuple[tuple[str, str], ...] = (
    (".env", "environment file (.env*)"),
    (".env[._-]*", "environment file (.env*)"),
    (".envrc", "environment file (.envrc)"),
    ("*.env", "environment file (*.env)"),
    ("*.pem", "certificate or key file (*.pem)"),
    ("*.key", "key file (*.key)"),
    ("*.p12", "key store (*.p12)"),
    ("*.pfx", "key store (*.pfx)"),
    ("*.jks", "key store (*.jks)"),
    ("*.keystore", "key store (*.keystore)"),
    ("*.asc", "PGP armored file (*.asc)"),
    ("*.gpg", "PGP file (*.gpg)"),
    ("*.ppk", "PuTTY private key (*.ppk)"),
    ("id_rsa*", "SSH private key (id_rsa*)"),
    ("id_dsa*", "SSH private key (id_dsa*)"),
    ("id_ecdsa*", "SSH private key (id_ecdsa*)"),
    ("id_ed25519*", "SSH private key (id_ed25519*)"),
    (".netrc", "credential file (.netrc)"),
    ("_netrc", "credential file (_netrc)"),
    (".pgpass", "credential file (.pgpass)"),
    (".npmrc", "credential file (.npmrc)"),
    (".pypirc", "credential file (.pypirc)"),
    (".git-credentials", "credential file (.git-credentials)"),
    (".htpasswd", "credential file (.htpasswd)"),
    ("credentials", "credential file (credentials)"),
    ("credentials.*", "credential file (credentials.*)"),
    ("*.credentials", "credential file (*.credentials)"),
    ("secrets.*", "secrets file (secrets.*)"),
    (".secrets.*", "secrets file (.secrets.*)"),
    ("*.secret", "secrets file (*.secret)"),
    ("*.secrets", "secrets file (*.secrets)"),
    ("service-account*.json", "cloud service account key (service-account*.json)"),
    ("*.tfvars", "Terraform variables (*.tfvars)"),
    ("*.tfstate", "Terraform state (*.tfstate)"),
    ("*.tfstate.*", "Terraform state (*.tfstate.*)"),
    ("kubeconfig", "Kubernetes credentials (kubeconfig)"),
)

_ANY_SECRET_FILE_NAME = re.compile("|".join(f"(?:{fnmatch.translate(pattern)})" for pattern, _ in SECRET_FILE_NAME_RULES), re.S)
_CREDENTIAL_DIRECTORIES = (".aws", ".ssh", ".gnupg", ".docker", ".kube")

# Public key halves are not secret; keep them out of the id_rsa* rule.
_PUBLIC_KEY_SUFFIXES = (".pub",)

# Only detectors with a specific format: the entropy detectors flag hashes and test vectors all over ordinary code,
# and a public IP address is not a secret. Artifactory, IBM, Cloudant and SoftLayer are left out: their regexes start
# with look-behinds that scan at ~10 MB/s, and the keyword rule below still catches "api_key = <value>" for them.
_FORMAT_DETECTORS = (
    "detect_secrets.plugins.private_key.PrivateKeyDetector",
    "detect_secrets.plugins.aws.AWSKeyDetector",
    "detect_secrets.plugins.github_token.GitHubTokenDetector",
    "detect_secrets.plugins.gitlab_token.GitLabTokenDetector",
    "detect_secrets.plugins.jwt.JwtTokenDetector",
    "detect_secrets.plugins.openai.OpenAIDetector",
    "detect_secrets.plugins.slack.SlackDetector",
    "detect_secrets.plugins.stripe.StripeDetector",
    "detect_secrets.plugins.pypi_token.PypiTokenDetector",
    "detect_secrets.plugins.npm.NpmDetector",
    "detect_secrets.plugins.sendgrid.SendGridDetector",
    "detect_secrets.plugins.twilio.TwilioKeyDetector",
    "detect_secrets.plugins.mailchimp.MailchimpDetector",
    "detect_secrets.plugins.discord.DiscordBotTokenDetector",
    "detect_secrets.plugins.telegram_token.TelegramBotTokenDetector",
    "detect_secrets.plugins.square_oauth.SquareOAuthDetector",
    "detect_secrets.plugins.azure_storage_key.AzureStorageKeyDetector",
    "detect_secrets.plugins.basic_auth.BasicAuthDetector",
)
_KEYWORD_DETECTOR = "detect_secrets.plugins.keyword.KeywordDetector"

# Cheap necessary conditions for the detector regexes that scan slowly: text without the gate cannot match the pattern,
# so the pattern is skipped. Keyed by the exact pattern text: a changed detect-secrets pattern runs ungated.
# ("literal", words): one of the words occurs; ("ascii-lower", words): one occurs in the lower-cased text (exact only
# for ASCII text, so non-ASCII text always runs the pattern); ("regex", pattern): a looser regex that starts with a
# literal (which re searches fast) matches.
_PATTERN_GATES: dict[str, tuple[str, object]] = {
    r"aws.{0,20}?(?:key|pwd|pw|password|pass|token).{0,20}?[\'\"]([0-9a-zA-Z/+]{40})[\'\"]": ("ascii-lower", ("aws",)),
    r"xox(?:a|b|p|o|s|r)-(?:\d+-)+[a-z0-9]+": ("ascii-lower", ("xox",)),
    r"https://hooks\.slack\.com/services/T[a-zA-Z0-9_]+/B[a-zA-Z0-9_]+/[a-zA-Z0-9_]+": ("ascii-lower", ("hooks.slack.com",)),
    r"(?:r|s)k_live_[0-9a-zA-Z]{24}": ("literal", ("k_live_",)),
    r"[0-9a-z]{32}-us[0-9]{1,2}": ("literal", ("-us",)),
    r"[MNO][a-zA-Z\d_-]{23,25}\.[a-zA-Z\d_-]{6}\.[a-zA-Z\d_-]{27}": ("regex", r"\.[a-zA-Z\d_-]{6}\.[a-zA-Z\d_-]{27}"),
    r"\d{8,10}:[0-9A-Za-z_-]{35}": ("regex", r":[0-9A-Za-z_-]{35}"),
    r"sk-[A-Za-z0-9-_]*[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}": ("literal", ("T3BlbkFJ",)),
    r"\/\/.+\/:_authToken=\s*((npm_.+)|([A-Fa-f0-9-]{36})).*": ("literal", ("/:_authToken=",)),
    r"(?:A3T[A-Z0-9]|ABIA|ACCA|AKIA|ASIA)[0-9A-Z]{16}": ("literal", ("A3T", "ABIA", "ACCA", "AKIA", "ASIA")),
    r"(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9_]{36}": ("literal", ("gh",)),
    r"(glpat|gldt|glft|glsoat|glrt)-[A-Za-z0-9_\-]{20,50}(?!\w)": ("literal", ("gl",)),
}

# A keyword hit ("password = ...") counts only when the value looks like a real credential, not a name or a placeholder.
_MIN_KEYWORD_VALUE_CHARS = 12
_MIN_KEYWORD_VALUE_ENTROPY_BITS = 3.0
# A placeholder is a template or a marker word, not any value holding "$" or "<": "Tr0ub4dor$3xKq9vLm" is a password.
# The short marker "your" counts only as a word: four random letters of a key spell it often enough.
_PLACEHOLDER = re.compile(
    r"\$\{[^}]*\}|\{\{.*?\}\}|%\(\w+\)s|^\$[A-Za-z_]\w*$|^<[^<>]*>$|x{4,}|\*{4,}"
    r"|example|changeme|placeholder|dummy|redacted|(?<![a-z])your(?![a-z])", re.IGNORECASE)

# Formats no detect-secrets detector knows (as of 1.5), each with the literal it starts with: checked only where
# the literal occurs.
_PROJECT_FORMATS: tuple[tuple[str, str, re.Pattern], ...] = (
    ("private key block", "PRIVATE KEY", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")),
    ("PuTTY private key", "PuTTY-User-Key-File-", re.compile(r"PuTTY-User-Key-File-\d+:")),
    ("GitHub fine-grained token", "github_pat_", re.compile(r"github_pat_[A-Za-z0-9_]{60,}")),
    ("Hugging Face token", "hf_", re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,40}(?![A-Za-z0-9_])")),
    ("Google API key", "AIza", re.compile(r"AIza[0-9A-Za-z_\-]{35}")),
    ("Anthropic API key", "sk-ant-", re.compile(r"sk-ant-[A-Za-z0-9_\-]{32,}")),
)

# detect-secrets' keyword list has no "token": "HF_TOKEN = ...", "access_token: ...", "Bearer ...". A value must be
# quoted in code (unquoted it is usually an expression), and may be bare in config files, as detect-secrets' own
# per-file-type rules have it.
_TOKEN_VALUE = r"[a-z0-9._~+/=-]{12,}"  # what tokens are made of (base64, hex, URL-safe); a regex or a template is not
# Searched in lower-cased text, each from a literal (which re finds fast, where an alternation is tried at every
# character); the key's whole name is read backwards from the match.
_ASSIGNED = r"[\"']?\s*(?:=|:=|:|=>)\s*([\"'])(?P<value>" + _TOKEN_VALUE + r")\1"
_ASSIGNED_BARE = r"[\"']?\s*(?:=|:)\s*(?P<value>" + _TOKEN_VALUE + r")(?![^\s,;#])"
_TOKEN_ASSIGNMENTS_QUOTED = tuple(re.compile(pattern) for pattern in (
    "token" + _ASSIGNED, "credentials?" + _ASSIGNED, r"bearer\s+(?P<value>" + _TOKEN_VALUE + ")"))
_TOKEN_ASSIGNMENTS_BARE = tuple(re.compile(pattern) for pattern in ("token" + _ASSIGNED_BARE,
                                                                    "credentials?" + _ASSIGNED_BARE))
# Tokens that are not credentials, by a word of the key's name: API handles for paging, locking, idempotency and
# change sets (AWS's NextToken, ClientRequestToken, ChangeToken ...), a public key's token, and a tokenizer's
# special tokens.
_HANDLE_TOKEN_WORDS = frozenset({
    "next", "page", "continuation", "cursor", "sync", "marker", "lock", "idempotency", "client", "request", "change",
    "update", "lifecycle", "verification", "export", "import", "copy", "public", "cancellation", "pad", "eos", "bos",
    "unk", "sep", "cls", "mask", "special", "start", "end", "stop",
})


def _names_a_handle(key: str) -> bool:
    if not key.lower().endswith("token"):
        return False
    words = re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", key[:-len("token")])
    # Any word of the name: nextForwardToken, CopyProductToken, LifecycleActionToken are handles too.
    return any(word.lower() in _HANDLE_TOKEN_WORDS for word in words)


# Where "password = hX9k2LmQ7vRt4ZpW" without quotes is the value itself, not an expression.
# Documentation is left out: its "secret:" and "password=" are mostly ARNs and examples (on the AWS CLI's 5,000
# example pages nearly every hit).
_LITERAL_VALUE_LANGUAGES = frozenset({"Shell", "Dockerfile", "Makefile", "Just", "Other"})


@dataclass(frozen=True)
class SecretFinding:
    rule: str
    """What matched, e.g. "private key block (detect-secrets: PrivateKeyDetector)"; never the secret value."""
    line_number: int
    """1-based; 0 for a match on the file name."""

    @property
    def reason(self) -> str:
        where = f", line {self.line_number}" if self.line_number else ""
        return f"secret: {self.rule}{where}"


def secret_file_name_rule(relative_path: str) -> SecretFinding | None:
    """The name rule a path breaks, if any, e.g. `.env.production` or `deploy/id_rsa`."""
    name = relative_path.rpartition("/")[2]
    if name in ("", "."):
        name = PurePosixPath(relative_path).name
    name = name.lower()
    if name.endswith(_PUBLIC_KEY_SUFFIXES):
        return None
    # One combined regex rules out most names at once; the loop then finds the first rule that matches.
    if _ANY_SECRET_FILE_NAME.match(name):
        for pattern, description in SECRET_FILE_NAME_RULES:
            if fnmatch.fnmatchcase(name, pattern):
                return SecretFinding(rule=f"file name: {description}", line_number=0)
    lowered = relative_path.lower()
    if not any(directory in lowered for directory in _CREDENTIAL_DIRECTORIES):
        return None
    for directory in PurePosixPath(lowered).parts[:-1]:
        if directory in _CREDENTIAL_DIRECTORIES:
            return SecretFinding(rule=f"file name: inside a credential directory ({directory}/)", line_number=0)
    return None


def _shannon_entropy_bits(value: str) -> float:
    counts = Counter(value)
    total = len(value)
    return -sum(n / total * math.log2(n / total) for n in counts.values())


def looks_like_credential(value: str) -> bool:
    value = value.strip()
    if len(value) < _MIN_KEYWORD_VALUE_CHARS or any(ch.isspace() for ch in value):
        return False
    if _PLACEHOLDER.search(value):
        return False
    if not (any(ch.isalpha() for ch in value) and any(ch.isdigit() for ch in value)):
        return False
    # Attribute chains and calls ("self.password", "get_token()") are code, not values.
    if re.fullmatch(r"[A-Za-z_][\w.]*(\(.*\))?", value) and ("." in value or "(" in value):
        return False
    return _shannon_entropy_bits(value) >= _MIN_KEYWORD_VALUE_ENTROPY_BITS


def _import_plugin(dotted: str):
    import importlib

    module_name, class_name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)()


class SecretScanner:
    """Scans decoded text with detect-secrets' detectors.

    detect-secrets works line by line in Python, which is too slow for a gigabyte; each detector's own regular
    expressions first search the whole text (in C), and only the lines they hit go through the detector itself.
    """

    def __init__(self) -> None:
        self._detectors = []
        for dotted in _FORMAT_DETECTORS:
            plugin = _import_plugin(dotted)
            prefilters = [(re.compile(p.pattern, p.flags | re.MULTILINE), _compile_gate(p.pattern)) for p in plugin.denylist]
            self._detectors.append((plugin, prefilters))
        self._keyword = _import_plugin(_KEYWORD_DETECTOR)
        from detect_secrets.plugins.keyword import DENYLIST

        # The same keywords as detect-secrets, searched in lower-cased text: re.IGNORECASE makes this 10x slower.
        self._keyword_prefilter_lower = re.compile("|".join(DENYLIST))
        self._keyword_prefilter = re.compile("|".join(DENYLIST), re.IGNORECASE)

    def scan(self, text: str, relative_path: str = "") -> SecretFinding | None:
        """The first secret found in the text, or None. `relative_path` picks the keyword rules for the file's type:
        in YAML, INI, TOML, .properties and files of no known language a value needs no quotes."""
        lowered = text.lower()
        is_ascii = text.isascii()
        for plugin, prefilters in self._detectors:
            for prefilter, gate in prefilters:
                if gate is not None and not _gate_open(gate, text, lowered, is_ascii):
                    continue
                for line_number, line in _hit_lines(prefilter, text):
                    for _value in plugin.analyze_string(line):
                        return SecretFinding(rule=_rule_name(plugin), line_number=line_number)
        for name, literal, pattern in _PROJECT_FORMATS:
            if literal in text:
                match = pattern.search(text)
                if match is not None:
                    return SecretFinding(rule=name, line_number=text.count("\n", 0, match.start()) + 1)
        keyword_rules, bare_values = _keyword_rules(relative_path)
        if len(lowered) == len(text):
            keyword_lines = ((n, text_line) for n, text_line in _hit_lines(self._keyword_prefilter_lower, lowered, text))
        else:
            keyword_lines = _hit_lines(self._keyword_prefilter, text)
        for line_number, line in keyword_lines:
            for value in self._keyword.analyze_string(line, denylist_regex_to_group=keyword_rules):
                if value and looks_like_credential(value):
                    return SecretFinding(rule=_rule_name(self._keyword), line_number=line_number)
        return _token_assignment(text, lowered, bare_values)


def _token_assignment(text: str, lowered: str, bare_values: bool) -> SecretFinding | None:
    """A credential assigned to a "...token" or "credentials" key, or sent as "Bearer ...", which detect-secrets'
    keyword list does not cover."""
    if len(lowered) != len(text):  # lower-casing changed the length (rare non-ASCII): search the text itself
        lowered = text
    patterns = _TOKEN_ASSIGNMENTS_QUOTED + (_TOKEN_ASSIGNMENTS_BARE if bare_values else ())
    for pattern in patterns:
        if lowered is text:
            pattern = re.compile(pattern.pattern, re.IGNORECASE)
        for match in pattern.finditer(lowered):
            value = text[slice(*match.span("value"))]
            if not match.group(0).startswith("bearer") and _names_a_handle(_key_before(text, match.start(),
                                                                                         match.group(0))):
                continue
            if looks_like_credential(value) and not _names_a_place(value):
                return SecretFinding(rule="secret keyword (token)", line_number=text.count("\n", 0, match.start()) + 1)
    return None


_PATH_LIKE = re.compile(r"[a-z0-9_.-]{1,24}(?:/[a-z0-9_.-]{1,24})+", re.IGNORECASE)


def _names_a_place(value: str) -> bool:
    """A path or a URL route, not a token: "/app/keys/service-account-1.json" (GOOGLE_APPLICATION_CREDENTIALS names a
    file), "oauth2/v1/token". Tokens with "/" are base64: long runs, not short lower-case segments."""
    if value.startswith(("/", "./", "../", "~/")) or re.search(r"\.[a-z]{2,5}$", value):
        return True
    return value == value.lower() and bool(_PATH_LIKE.fullmatch(value))


def _key_before(text: str, start: int, matched: str) -> str:
    """The whole key name whose end the match starts with: "HF_TOKEN" for a match at "TOKEN = ...", read back over
    the characters of a name."""
    key_start = start
    while key_start > 0 and (text[key_start - 1].isalnum() or text[key_start - 1] in "_.-"):
        key_start -= 1
    keyword = re.match(r"[a-z]+", matched.lower()).group(0)
    return text[key_start:start + len(keyword)]


def _keyword_rules(relative_path: str):
    """detect-secrets' keyword regexes for the file's type, and whether a bare (unquoted) value counts."""
    from detect_secrets.plugins.keyword import (
        CONFIG_DENYLIST_REGEX_TO_GROUP, QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, REGEX_BY_FILETYPE)
    from detect_secrets.util.filetype import determine_file_type

    if not relative_path:
        return QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, False
    rules = REGEX_BY_FILETYPE.get(determine_file_type(relative_path))
    if rules is None:  # a type detect-secrets has no rules for: bare values count where text is literal
        bare = language_of(relative_path) in _LITERAL_VALUE_LANGUAGES
        return (CONFIG_DENYLIST_REGEX_TO_GROUP if bare else QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP), bare
    return rules, rules is CONFIG_DENYLIST_REGEX_TO_GROUP


def content_rules(relative_path: str) -> str:
    """Which content rules a path gets (its keyword rules depend on its file type): the same text under two paths of
    one kind gets the same verdict, so a verdict may be reused across them, and only across them."""
    from detect_secrets.plugins.keyword import REGEX_BY_FILETYPE
    from detect_secrets.util.filetype import determine_file_type

    file_type = determine_file_type(relative_path)
    if file_type in REGEX_BY_FILETYPE:
        return file_type.name.lower()
    return "literal" if _keyword_rules(relative_path)[1] else "quoted"


def _compile_gate(pattern: str):
    gate = _PATTERN_GATES.get(pattern)
    if gate is not None and gate[0] == "regex":
        return "regex", re.compile(gate[1])
    return gate


def _gate_open(gate, text: str, lowered: str, is_ascii: bool) -> bool:
    kind, value = gate
    if kind == "literal":
        return any(word in text for word in value)
    if kind == "ascii-lower":
        return not is_ascii or any(word in lowered for word in value)
    return value.search(text) is not None


def _rule_name(plugin) -> str:
    return f"{plugin.secret_type.lower()} (detect-secrets: {type(plugin).__name__})"


def _hit_lines(prefilter: re.Pattern, text: str, original: str | None = None):
    """(1-based line number, line) for each line where the prefilter matches, each line once.

    `original` is the text the lines are cut from when `text` is a same-length transform of it (lower-cased).
    """
    original = text if original is None else original
    position = 0
    counted_to, lines_before = 0, 0
    while True:
        match = prefilter.search(text, position)
        if match is None:
            return
        line_start = text.rfind("\n", 0, match.start()) + 1
        line_end = text.find("\n", match.start())
        if line_end < 0:
            line_end = len(text)
        lines_before += text.count("\n", counted_to, line_start)
        counted_to = line_start
        yield lines_before + 1, original[line_start:line_end]
        # Resume at the next line so that a match spanning lines cannot hide a later one.
        position = line_end + 1
        if position > len(text):
            return
