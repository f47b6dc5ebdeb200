"""The documentation still describes the project: every relative link in README.md, BENCHMARKS.md and
docs/*.md reaches a file (and its heading, for a link with an anchor), every ``lora-compress CMD --flag``
quoted names a real command and real flags of the click CLI, and every script quoted exists."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from lora_compress.cli import main

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)|!\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`\n]+)`")
SCRIPT = re.compile(r"\b(?:python|bash)\s+((?:scripts|examples)/[\w./-]+\.(?:py|sh))")


def ids(paths):
    return [str(path.relative_to(REPO)) for path in paths]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def code_lines(text: str) -> list[str]:
    """Each line of a fenced block, and each inline code span, with line continuations joined."""
    blocks = [block.replace("\\\n", " ") for block in FENCE.findall(text)]
    return [line for block in blocks for line in block.splitlines()] + INLINE.findall(FENCE.sub("", text))


def commands() -> dict[str, set[str]]:
    """Each command of the CLI and the flags it takes."""
    names = {}
    for name, command in main.commands.items():
        flags = {"--help"}
        for param in command.params:
            if isinstance(param, click.Option):
                flags.update(opt for opt in param.opts + param.secondary_opts if opt.startswith("--"))
        names[name] = flags
    return names


def quoted_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, flags) of every ``lora-compress CMD …`` in code, and of every inline span ``CMD --flag …``
    that starts with a command's name; a shell comment ends the command."""
    found = []
    known = commands()
    for line in code_lines(text):
        for match in re.finditer(r"(?:^|[\s(])lora-compress\s+([a-z][\w-]*)([^#|;&]*)", line):
            found.append((match.group(1), re.findall(r"(?<![\w-])(--[\w-]+)", match.group(2))))
        first = line.split()[0] if line.split() else ""
        if first in known and "lora-compress" not in line and re.search(r"\s--[\w-]", line):
            found.append((first, re.findall(r"(?<![\w-])(--[\w-]+)", line.split("#")[0])))
    return found


@pytest.mark.parametrize("path", DOCS, ids=ids(DOCS))
def test_every_relative_link_reaches_a_file_and_its_heading(path):
    broken = []
    for groups in LINK.findall(FENCE.sub("", path.read_text())):
        target = groups[0] or groups[1]
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{path.name}: {broken}"


@pytest.mark.parametrize("path", DOCS, ids=ids(DOCS))
def test_every_quoted_command_names_real_flags(path):
    known = commands()
    wrong = [f"lora-compress {name} {' '.join(flags)}" for name, flags in quoted_commands(path.read_text())
             if name not in known or not set(flags) <= known[name]]
    assert not wrong, f"{path.name} quotes commands or flags the CLI does not have: {wrong}"


@pytest.mark.parametrize("path", DOCS, ids=ids(DOCS))
def test_every_quoted_script_exists(path):
    missing = sorted({script for script in SCRIPT.findall(path.read_text()) if not (REPO / script).exists()})
    assert not missing, f"{path.name} quotes scripts that do not exist: {missing}"


def test_the_docs_name_the_solver_flag_not_its_deprecated_alias():
    assert "--svd" in commands()["compress"]  # still accepted …
    teaching = [path for path in DOCS if path.name != "BENCHMARKS.md"]  # BENCHMARKS.md: tables as measured
    assert [path.name for path in teaching if re.search(r"--svd\b", path.read_text())] == []  # … but not taught


def test_the_checker_finds_what_it_checks():
    quoted = quoted_commands("```bash\nlora-compress compress M --budget 0.8 --out o  # --not-a-flag\n```\n"
                             "Use `evaluate --tasks T` and `heal`.")
    assert quoted == [("compress", ["--budget", "--out"]), ("evaluate", ["--tasks"])]
    assert "--nope" not in commands()["compress"] and "--budget" in commands()["compress"]
    assert slug("Mixture-of-experts, encoder-decoder and task-head models") == \
        "mixture-of-experts-encoder-decoder-and-task-head-models"
    assert SCRIPT.findall("run `python scripts/demo.py` or bash scripts/test.sh") == ["scripts/demo.py",
                                                                                       "scripts/test.sh"]


def test_the_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in text
    assert "examples/" in text and "docs/" in text


def test_adding_a_method_in_the_docs_is_the_code_examples_06_runs():
    section = (REPO / "docs" / "architecture.md").read_text().split("## Adding a method", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1).strip()
    assert "register_method" in snippet and "Collector" in snippet
    assert snippet in (REPO / "examples" / "06_new_method.py").read_text()


@pytest.mark.parametrize("path", [p for p in DOCS if p.name not in ("research-domains.md", "BENCHMARKS.md")],
                         ids=ids([p for p in DOCS if p.name not in ("research-domains.md", "BENCHMARKS.md")]))
def test_every_module_path_named_exists(path):
    """A path such as pipelines/plan.py or tests/test_faults.py names a file of the repository or the package
    (the research log and the benchmark record keep the names of their day)."""
    named = set(re.findall(r"(?<![\w./-])((?:[a-z_]+/)+[a-z_0-9]+\.(?:py|md|sh))\b", path.read_text()))
    missing = sorted(p for p in named if not (REPO / p).exists() and not (REPO / "lora_compress" / p).exists())
    assert not missing, f"{path.name} names files that do not exist: {missing}"
