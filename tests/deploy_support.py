"""Helpers of the deployment tests: read the Dockerfile's stages, apply .dockerignore, and render
kustomize overlays (resources + JSON6902 patches) without a kubectl/kustomize binary."""

from __future__ import annotations

import copy
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


# --- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON array of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
        text = self.args.split("CMD", 1)[1] if self.keyword == "HEALTHCHECK" else self.args
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None

    def flags(self) -> dict[str, str]:
        """Leading --name=value options (COPY --from=..., HEALTHCHECK --interval=...)."""
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.args.split("CMD", 1)[0]))


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def dockerfile_stages(path: Path = ROOT / "Dockerfile") -> dict[str, Stage]:
    """Stages by name, in order, from a Dockerfile (comments dropped, continuations joined)."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines inside a continued RUN are dropped by Docker too
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    stages: dict[str, Stage] = {}
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            stages[m.group(2)] = Stage(name=m.group(2), base=m.group(1))
        else:
            assert stages, f"{keyword} before the first FROM"
            list(stages.values())[-1].instructions.append(Instruction(keyword, args.strip()))
    return stages


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY, its --options left out."""
    words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
    return words[:-1], words[-1]


# --- requirements ------------------------------------------------------------------------------


def requirement_lines(path: Path) -> list[str]:
    """Requirement lines of a requirements file, comments dropped, `-r` includes followed."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            lines += requirement_lines(path.parent / line[3:].strip())
        elif line:
            lines.append(line)
    return lines


def requirement_names(path: Path) -> list[str]:
    """Project names (lower case) a requirements file asks for, includes followed."""
    return [re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0].lower() for line in requirement_lines(path)]


# --- .dockerignore ------------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a relative path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(relative: str, ignore_file: Path = ROOT / ".dockerignore") -> bool:
    """Whether Docker leaves `relative` (a path in the build context) out of the context.

    As Docker does: the last matching line wins, `!` lines re-include, and a pattern that matches
    a directory excludes everything under it.
    """
    rules = []
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line[1:] if keep else line
        rules.append((keep, _ignore_regex(pattern.strip("/"))))
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for keep, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not keep
    return excluded


# --- YAML and kustomize -------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"a JSON pointer starts with '/': {path!r}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _walk(doc, tokens: list[str]):
    for t in tokens:
        doc = doc[int(t)] if isinstance(doc, list) else doc[t]
    return doc


def apply_json6902(doc: dict, operations: list[dict]) -> dict:
    """RFC 6902 (add, remove, replace, test; what kustomize's `patches` accept as JSON6902) on a copy.

    Strict, as kustomize is: replacing or removing a missing member, or a failed test, raises.
    """
    doc = copy.deepcopy(doc)
    for op in operations:
        tokens = _pointer(op["path"])
        parent, last = _walk(doc, tokens[:-1]), tokens[-1]
        kind = op["op"]
        if kind == "test":
            assert _walk(doc, tokens) == op["value"], f"JSON6902 test failed at {op['path']}"
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            index = int(last) if isinstance(parent, list) else last
            if isinstance(parent, list):
                assert 0 <= index < len(parent), f"no element to replace at {op['path']}"
            else:
                assert last in parent, f"no member to replace at {op['path']}"
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                assert last in parent, f"no member to remove at {op['path']}"
                del parent[last]
        else:
            raise AssertionError(f"JSON6902 op {kind!r} is not supported by this renderer")
    return doc


KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}


def render_kustomization(directory: Path) -> list[dict]:
    """The resources a kustomization directory builds: its `resources` (files or other
    kustomization directories, recursively), then its JSON6902 `patches`.

    Only the kustomize features these manifests use; any other key fails loudly, so the renderer
    never silently differs from `kubectl kustomize`.
    """
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization keys this renderer does not implement: {sorted(unknown)}"
    docs: list[dict] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        docs += render_kustomization(target) if target.is_dir() else yaml_documents(target)
    for patch in k.get("patches", []):
        assert set(patch) <= {"path", "target"}, f"{directory}: only file JSON6902 patches with a target: {patch}"
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(operations, list), f"{patch['path']} is not a JSON6902 list of operations"
        target = patch["target"]
        assert set(target) <= {"group", "version", "kind", "name"}, target
        hits = [i for i, d in enumerate(docs) if _selected(d, target)]
        assert hits, f"{directory}: patch {patch['path']} selects no resource ({target})"
        for i in hits:
            docs[i] = apply_json6902(docs[i], operations)
    return docs


def _selected(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (
        target.get("kind", doc["kind"]) == doc["kind"]
        and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )
