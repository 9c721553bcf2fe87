"""Profiles: an overlay of ``params.yaml`` (e.g. ``params.full.yaml``) run as one DVC experiment.

    .venv/bin/python scripts/run_profile.py check params.full.yaml   # validate; print the merged changes
    .venv/bin/python scripts/run_profile.py args  params.full.yaml   # print the `dvc exp run -S …` command
    .venv/bin/python scripts/run_profile.py run   params.full.yaml [DVC EXP RUN OPTIONS]   # = make reproduce-full
    .venv/bin/python scripts/run_profile.py apply params.full.yaml   # write the profile into params.yaml; run nothing

An overlay holds only the keys that differ from ``params.yaml``, in the same layout. It is merged
section by section and key by key; the value of a key replaces the one in ``params.yaml`` whole,
lists and mappings included (``grid.train: {}`` empties the grid's overrides, ``ablations.rows:
{full: {}}`` keeps one row). Before anything runs, the overlay is checked against the typed config
(`cartlib.config`): an unknown section or key fails naming the overlay file and the key, and the
merged params are validated as ``params.yaml`` is (`params_from_dict`); then the ``-S`` arguments
are applied to a scratch copy of ``params.yaml`` with DVC's own code, and must give exactly the
merged params.

``-S`` takes Hydra overrides (``key=value``; the value in Hydra's grammar, so lists ``[a, b]`` and
mappings ``{k: v}`` survive). Hydra *merges* a mapping into an existing one (``-S 'grid.train={}'``
changes nothing), so a mapping value is set by deleting the key and adding it again
(``-S '~grid.train' -S '+grid.train={}'``); a key ``params.yaml`` lacks is added (``+key=value``).

`run` is ``dvc exp run`` in the workspace, as ``make reproduce`` is ``dvc repro``: ``params.yaml``
is left with the overlay applied, the results are in the workspace (``dvc status`` clean) and the
run is also an experiment that ``dvc exp show`` lists. Extra options go to ``dvc exp run``
(``--temp`` or ``--queue`` to keep the workspace as it is; ``-n NAME``). docs/full_profile.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from cartlib.config import SECTIONS, ConfigError, Params, params_from_dict

PARAMS = "params.yaml"
BIN = Path(sys.executable).parent  # the venv's bin: dvc, cart-stage

Key = tuple[str, ...]
_KEYWORDS = {"true", "false", "null", "inf", "nan"}  # what Hydra reads as other than a string when unquoted


@dataclasses.dataclass(frozen=True)
class Profile:
    overlay: Path
    changes: list[tuple[Key, Any]]  # (key path, value) per overlaid key, in the overlay's order
    merged: dict  # params.yaml with the overlay applied (what DVC will write)
    params: Params  # the typed config of the merged params
    sets: list[str]  # the `dvc exp run -S` overrides, in order

    def command(self, *extra: str) -> list[str]:
        """``dvc exp run -S …`` (without the dvc executable)."""
        return ["exp", "run", *(a for s in self.sets for a in ("-S", s)), *extra]


def load_yaml(path: Path, what: str) -> dict:
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def overlay_keys(overlay: Mapping, *, source: str) -> list[tuple[Key, Any]]:
    """The overlaid keys as (path, value): ``section.key`` or ``smoke.section.key``; unknown ones raise."""
    out: list[tuple[Key, Any]] = []
    for name, section in overlay.items():
        if name == "smoke":
            if not isinstance(section, Mapping):
                raise ConfigError(f"{source}: smoke: expected a mapping of section overrides, got {section!r}")
            for sub, values in section.items():
                out += _section_keys(("smoke", sub), values, source)
        else:
            out += _section_keys((name,), section, source)
    return out


def _section_keys(path: Key, values: Any, source: str) -> list[tuple[Key, Any]]:
    dotted = ".".join(path)
    cls = SECTIONS.get(path[-1])
    if cls is None:
        raise ConfigError(f"{source}: unknown section {dotted!r}; "
                          f"expected one of {sorted(SECTIONS)} (or smoke.<section>)")
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {dotted}: expected a mapping of keys, got {values!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {dotted}.{key!s}; known keys of {path[-1]}: {fields}")
    return [((*path, str(key)), value) for key, value in values.items()]


def merge(params: Mapping, changes: list[tuple[Key, Any]]) -> dict:
    """``params`` with each key set to its value (a key's value replaces the old one whole)."""
    out = copy.deepcopy(dict(params))
    for key, value in changes:
        node = out
        for k in key[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[key[-1]] = copy.deepcopy(value)
    return out


def hydra_value(value: Any, where: str = "value") -> str:
    """``value`` in Hydra's override grammar (what ``dvc exp run -S key=VALUE`` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: {value!r} cannot be passed to dvc exp run -S")
        return repr(value)  # 0.0, 0.002, 1e-05: floats in Hydra's grammar
    if isinstance(value, str):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) and value.lower() not in _KEYWORDS:
            return value  # a plain name: Hydra reads it as that string
        for quote in ('"', "'"):
            if quote not in value and "\\" not in value and "${" not in value:
                return f"{quote}{value}{quote}"  # quoted, a string stays a string ("1", "true", "cuda:0")
        raise ConfigError(f"{where}: the string {value!r} cannot be passed to dvc exp run -S "
                          "(quotes, backslash or ${)")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(hydra_value(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        for k in value:
            if not (isinstance(k, str) and k.isidentifier()):
                raise ConfigError(f"{where}: the key {k!r} cannot be passed to dvc exp run -S (a name is needed)")
        return "{" + ", ".join(f"{k}: {hydra_value(v, where)}" for k, v in value.items()) + "}"
    raise ConfigError(f"{where}: {value!r} ({type(value).__name__}) cannot be passed to dvc exp run -S")


def set_args(params: Mapping, changes: list[tuple[Key, Any]]) -> list[str]:
    """The ``-S`` overrides that turn ``params`` into ``merge(params, changes)``."""
    sets = []
    for key, value in changes:
        dotted = ".".join(key)
        text = hydra_value(value, dotted)
        old, exists = _get(params, key)
        if not exists:
            sets.append(f"+{dotted}={text}")  # Hydra adds the key (and missing parents)
        elif isinstance(old, Mapping) or isinstance(value, Mapping):
            sets += [f"~{dotted}", f"+{dotted}={text}"]  # `key={…}` would merge into the old mapping
        else:
            sets.append(f"{dotted}={text}")
    return sets


def _get(data: Any, key: Key) -> tuple[Any, bool]:
    for k in key:
        if not isinstance(data, Mapping) or k not in data:
            return None, False
        data = data[k]
    return data, True


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True)  # 0 and 0.0 differ, as they do to the typed config


def apply_sets(params_file: Path, sets: list[str]) -> dict:
    """What ``dvc exp run -S …`` writes to ``params_file``: applied by DVC's code to a scratch copy."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / PARAMS
        shutil.copyfile(params_file, scratch)
        if sets:
            apply_overrides(scratch, sets)
        return yaml.safe_load(scratch.read_text(encoding="utf-8")) or {}


def load(overlay: str | Path, *, root: str | Path = ".", check_dvc: bool = True) -> Profile:
    """Read, check and translate an overlay of ``<root>/params.yaml``; raises `ConfigError` before anything runs."""
    root, overlay = Path(root), Path(overlay)
    path = overlay if overlay.is_absolute() or overlay.exists() else root / overlay
    source = str(overlay)
    base = load_yaml(root / PARAMS, "params file")
    changes = overlay_keys(load_yaml(path, "profile (overlay of params.yaml)"), source=source)
    merged = merge(base, changes)
    params = params_from_dict(merged, source=f"{source} (merged into {PARAMS})")
    sets = set_args(base, changes)
    if check_dvc:
        try:
            written = apply_sets(root / PARAMS, sets)
        except Exception as e:  # dvc's InvalidArgumentError (a Hydra parse error) and the like
            raise ConfigError(f"{source}: dvc exp run -S cannot apply {sets}: {e} ({e.__cause__ or ''})") from None
        if _canonical(written) != _canonical(merged):
            diff = [".".join(k) for k in sorted(set(_flat(written)) | set(_flat(merged)))
                    if _canonical(_flat(written).get(k)) != _canonical(_flat(merged).get(k))]
            raise ConfigError(f"{source}: dvc exp run -S would not write the merged params (keys {diff}); "
                              f"arguments: {sets}")
    return Profile(overlay=path, changes=changes, merged=merged, params=params, sets=sets)


def _flat(data: Any, prefix: Key = ()) -> dict[Key, Any]:
    if isinstance(data, Mapping) and data:
        out: dict[Key, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, (*prefix, str(k))))
        return out
    return {prefix: data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_profile.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("check", "validate the overlay and list what it changes"),
                       ("args", "print the dvc exp run command (shell-quoted)"),
                       ("apply", "write the overlay into params.yaml (as dvc exp run -S would); run nothing"),
                       ("run", "validate, then run dvc exp run with the overlay (in the workspace)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("overlay", help="e.g. params.full.yaml")
        p.add_argument("--root", default=".", help="the repository (default: .)")
        if name in ("args", "run"):
            p.add_argument("dvc_args", nargs=argparse.REMAINDER,
                           help="more dvc exp run options (--temp, --queue, -n NAME)")
    args = parser.parse_args(argv)
    try:
        profile = load(args.overlay, root=args.root)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = list(getattr(args, "dvc_args", []))
    extra = extra[1:] if extra[:1] == ["--"] else extra
    cmd = [str(BIN / "dvc") if (BIN / "dvc").exists() else "dvc", *profile.command(*extra)]
    if args.command in ("check", "apply"):
        print(f"{profile.overlay}: valid; changes to {PARAMS}:")
        for key, value in profile.changes:
            print(f"  {'.'.join(key)}: {json.dumps(value)}")
        if args.command == "apply" and profile.sets:
            from dvc.utils.hydra import apply_overrides

            apply_overrides(Path(args.root) / PARAMS, profile.sets)
            print(f"written to {Path(args.root) / PARAMS}")
        return 0
    print(shlex.join(cmd), flush=True)
    if args.command == "args":
        return 0
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    return subprocess.run(cmd, cwd=args.root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
