"""The walk: gitignore at every level, symlinks never followed, odd names, deep trees, content classification."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from elite_core import repo_scan
from elite_core.repo_scan import decode_text, scan_repository


def write(root: Path, relative: str, content: str | bytes = "x = 1\n") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def kept_and_reasons(root: Path) -> tuple[set[str], dict[str, str]]:
    scan = scan_repository(root)
    return {c.relative_path for c in scan.candidates}, {s.relative_path: s.reason for s in scan.skipped}


def test_gitignore_at_several_levels_and_info_exclude(tmp_path):
    write(tmp_path, ".gitignore", "*.log\nbuild/\n!keep.log\n")
    write(tmp_path, ".git/info/exclude", "local_only.py\n")
    write(tmp_path, ".git/config", "[core]\n")
    write(tmp_path, "main.py")
    write(tmp_path, "debug.log", "log\n")
    write(tmp_path, "keep.log", "kept\n")
    write(tmp_path, "local_only.py")
    write(tmp_path, "build/out.py")
    write(tmp_path, "pkg/.gitignore", "generated_*.py\n!generated_keep.py\n/anchored.py\n")
    write(tmp_path, "pkg/generated_a.py")
    write(tmp_path, "pkg/generated_keep.py")
    write(tmp_path, "pkg/anchored.py")
    write(tmp_path, "pkg/sub/anchored.py")
    write(tmp_path, "pkg/sub/.gitignore", "!*.log\n")
    write(tmp_path, "pkg/sub/trace.log", "re-included by the deeper file\n")

    kept, reasons = kept_and_reasons(tmp_path)

    assert kept == {".gitignore", "main.py", "keep.log", "pkg/.gitignore", "pkg/generated_keep.py",
                    "pkg/sub/.gitignore", "pkg/sub/anchored.py", "pkg/sub/trace.log"}
    assert reasons["debug.log"] == "gitignored"
    assert reasons["build/"] == "gitignored"
    assert reasons["local_only.py"] == "gitignored"
    assert reasons["pkg/generated_a.py"] == "gitignored"
    assert reasons["pkg/anchored.py"] == "gitignored"
    assert not any(path.startswith(".git/") for path in kept | set(reasons))


def test_a_folder_inside_a_work_tree_follows_the_ignore_files_above_it(tmp_path):
    """Pointed at services/api of a monorepo, the walk sees what git sees there: the outer .gitignore files and the
    work tree's info/exclude apply, each at its own depth."""
    write(tmp_path, ".git/info/exclude", "NOTES.md\n")
    write(tmp_path, ".gitignore", "build/\n")
    write(tmp_path, "services/.gitignore", "*.generated.py\n")
    write(tmp_path, "services/api/app.py")
    write(tmp_path, "services/api/NOTES.md", "notes\n")
    write(tmp_path, "services/api/build/out.py")
    write(tmp_path, "services/api/models.generated.py")
    kept, reasons = kept_and_reasons(tmp_path / "services" / "api")
    assert kept == {"app.py"}
    assert reasons == {"NOTES.md": "gitignored", "build/": "gitignored", "models.generated.py": "gitignored"}


def test_a_root_the_outer_ignore_files_ignore_is_walked_by_its_own_rules_alone(tmp_path):
    """A project folder under a home directory kept in git with "*" ignored (or a virtualenv inside pyenv's checkout,
    which ignores /versions/): git would show nothing, but the user chose that folder for its content."""
    write(tmp_path, ".git/config", "[core]\n")
    write(tmp_path, ".gitignore", "*\n!.gitignore\n")
    write(tmp_path, "projects/tool/main.py")
    write(tmp_path, "projects/tool/.gitignore", "*.log\n")
    write(tmp_path, "projects/tool/debug.log", "log\n")
    kept, reasons = kept_and_reasons(tmp_path / "projects" / "tool")
    assert kept == {"main.py", ".gitignore"} and reasons == {"debug.log": "gitignored"}


def test_ignore_files_git_reads_differently_from_a_plain_parser(tmp_path):
    """A byte order mark before the first pattern, and lines that are not valid patterns, which git skips."""
    write(tmp_path, ".gitignore", "\ufeffprod_dump.sql\n")
    write(tmp_path, "prod_dump.sql", "insert 1;\n")
    write(tmp_path, "pkg/.gitignore", "!\nbuild\\\n[z-a].log\n*.tmp\n")
    write(tmp_path, "pkg/mod.py")
    write(tmp_path, "pkg/scratch.tmp", "tmp\n")
    kept, reasons = kept_and_reasons(tmp_path)
    assert kept == {".gitignore", "pkg/.gitignore", "pkg/mod.py"}
    assert reasons == {"prod_dump.sql": "gitignored", "pkg/scratch.tmp": "gitignored"}


def test_symlinks_out_of_repo_loops_and_dangling_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    write(outside, "secret_data.py", "outside = True\n")
    repo = tmp_path / "repo"
    write(repo, "real.py")
    os.symlink(outside, repo / "link_out_dir")
    os.symlink(outside / "secret_data.py", repo / "link_out_file.py")
    os.symlink(repo / "real.py", repo / "link_in.py")
    os.symlink(repo / "loop_a", repo / "loop_b")
    os.symlink(repo / "loop_b", repo / "loop_a")
    os.symlink(repo / "self_dir", repo / "self_dir")
    os.symlink(repo / "missing.py", repo / "dangling.py")
    (repo / "nested").mkdir()
    os.symlink(repo, repo / "nested" / "back_to_root")

    kept, reasons = kept_and_reasons(repo)

    assert kept == {"real.py"}
    assert reasons["link_out_dir"] == "symlink: points outside the repository"
    assert reasons["link_out_file.py"] == "symlink: points outside the repository"
    assert reasons["link_in.py"].startswith("symlink: target inside")
    assert reasons["nested/back_to_root"].startswith("symlink: target inside")
    for name in ("loop_a", "loop_b", "self_dir", "dangling.py"):
        assert reasons[name].startswith("symlink: dangling or loop"), name


def test_odd_names_and_a_very_deep_tree(tmp_path):
    names = ["with space.py", "new\nline.py", "ünïcødé_日本.py", "tab\there.py", "-dash.py", "quote'\".py"]
    for name in names:
        write(tmp_path, name)
    undecodable = os.fsencode(tmp_path) + b"/bad\xffname.py"
    with open(undecodable, "wb") as handle:
        handle.write(b"y = 2\n")
    deep = "/".join(["d"] * 300) + "/leaf.py"
    write(tmp_path, deep)

    kept, _ = kept_and_reasons(tmp_path)

    assert set(names) <= kept
    assert deep in kept
    assert os.fsdecode(b"bad\xffname.py") in kept
    assert repo_scan.display_path("new\nline.py") == "new\\nline.py"
    assert repo_scan.display_path(os.fsdecode(b"bad\xffname.py")) == "bad\\xffname.py"


def test_fifo_is_not_read(tmp_path):
    write(tmp_path, "a.py")
    os.mkfifo(tmp_path / "pipe.py")
    kept, reasons = kept_and_reasons(tmp_path)
    assert kept == {"a.py"}
    assert reasons["pipe.py"] == "not a regular file"


def test_unreadable_directory_is_recorded(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything; the FIFO test covers files the walk cannot read")
    write(tmp_path, "locked/a.py")
    os.chmod(tmp_path / "locked", 0)
    try:
        _, reasons = kept_and_reasons(tmp_path)
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert reasons["locked/"].startswith("unreadable directory")


def test_name_rules_lock_files_vendored_size_cap(tmp_path):
    write(tmp_path, "poetry.lock", "[[package]]\n")
    write(tmp_path, "package-lock.json", "{}\n")
    write(tmp_path, "bun.lock", "{}\n")
    write(tmp_path, "ios/Package.resolved", "{}\n")
    write(tmp_path, "node_modules/lib/index.js", "module.exports = 1\n")
    write(tmp_path, "app.min.js", "var a=1;\n")
    write(tmp_path, "proto/msg_pb2.py", "x = 1\n")
    write(tmp_path, "big.py", "#" * 2000 + "\n")
    write(tmp_path, "empty.py", "")

    scan = scan_repository(tmp_path, max_file_bytes=1000)
    reasons = {s.relative_path: s.reason for s in scan.skipped}

    assert scan.candidates == []
    assert reasons["poetry.lock"] == "lock file"
    assert reasons["package-lock.json"] == reasons["bun.lock"] == reasons["ios/Package.resolved"] == "lock file"
    assert reasons["node_modules/"] == "vendored or tool directory"
    assert reasons["app.min.js"].startswith("minified")
    assert reasons["proto/msg_pb2.py"] == "generated (protobuf)"
    assert reasons["big.py"] == "too large (2001 bytes > cap 1000)"
    assert reasons["empty.py"] == "empty file"


def test_binary_is_judged_by_content_not_extension():
    assert decode_text(b"\x7fELF\x02\x01\x01\x00\x00\x00")[0] is None
    assert decode_text(b"PK\x03\x04" + bytes(range(256)) * 4)[0] is None
    assert decode_text("print('hi')\n".encode())[0] == "print('hi')\n"
    # A text file with a binary-looking extension is still text.
    assert decode_text(b"plain text in a .bin file\n") == ("plain text in a .bin file\n", "utf-8")


def test_decoding_policy_for_non_utf8():
    assert decode_text("\ufeffbom = 1\n".encode("utf-8")) == ("bom = 1\n", "utf-8")
    assert decode_text("wide = 'ß'\n".encode("utf-16")) == ("wide = 'ß'\n", "utf-16")
    # A UTF-16 byte order mark does not make binary data text.
    control_words = "".join(chr(code) for code in range(1, 9)).encode("utf-16-le")
    assert decode_text(b"\xff\xfe" + control_words * 64) == (None, "binary (control characters)")
    latin1_comment = ("# caf\xe9\n" + "x = 1\n" * 50).encode("latin-1")
    text, how = decode_text(latin1_comment)
    assert how == "utf-8 with replacement" and text.startswith("# caf\ufffd\n")
    mostly_latin1 = "àéîõü çñ øå ".encode("latin-1") * 20
    assert decode_text(mostly_latin1) == (None, "binary or unknown encoding (not UTF-8)")


def test_minified_and_generated_content():
    assert repo_scan.content_skip_reason("var a=1;" * 1000).startswith("minified")
    assert repo_scan.content_skip_reason("// Code generated by protoc-gen-go. DO NOT EDIT.\npackage x\n").startswith("generated")
    assert repo_scan.content_skip_reason("def f():\n    return 1\n" * 200) is None


def test_local_imports_found_cheaply():
    python = "import os\nfrom .models import User\nfrom . import utils, helpers\nfrom pkg.views import index\n"
    assert set(repo_scan.local_import_stems("app/api.py", python)) >= {"models", "utils", "helpers", "views", "os"}
    script = "import x from './store.js'\nconst y = require('../lib/util')\n"
    assert set(repo_scan.local_import_stems("web/app.ts", script)) == {"store", "util"}
    assert repo_scan.local_import_stems("src/a.c", '#include "b.h"\n#include <stdio.h>\n') == ["b"]
