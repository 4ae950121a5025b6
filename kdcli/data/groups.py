"""Leak-free splits: images that share a group (frames of one video, tiles of one scene, shots of one place)
never straddle train, val and test, and folds hold out whole groups (scikit-learn's `GroupKFold` idea).

A group is named by a regular expression over an image's file name (`--group`): the first capture group that
took part in the match (with alternatives such as `^(Drone2)_|^(\\d+)_`, whichever matched), else the whole
match. An image it does not match is an error naming the file, never a group of its own, which could leak.
`--group-file` gives the groups as a table instead (CSV rows `file,group`, every image listed), for groupings no
expression can write, such as the segments of a video.

Folds (`--folds K`): groups are dealt into K folds of about equal image counts (largest group first, to the
lightest fold; with K equal to the number of groups, one group per fold in name order). Fold k tests on its
groups and carves val from the other groups by `--val-fraction`. `--fold-by REGEX` names a coarser unit (a
flight, a site, a sensor; images it does not match form one unit, `(unmatched)`) and folds hold out whole units
(one unit per fold unless `--folds` says fewer folds): fold k trains on the other units only and splits its
held-out units into val (a `--val-fraction` share of them) and test, by group. Every group must lie inside one
unit. Without `--group` every image is its own group: near-duplicates may then straddle splits.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.data import coco
from kdcli.data.sources import Option
from kdcli.data.sources.common import val_split
from kdcli.errors import KdcliError

UNMATCHED_UNIT = "(unmatched)"  # the fold unit of images --fold-by does not match
LISTED = 100  # a split's group names are recorded in dataset.yaml up to this many

GROUP = Option("group", str | None, None,
               "Regular expression over file names naming each image's group (its first capture group, else the "
               "whole match), e.g. '^(\\d+)_': a group never straddles train, val and test. An image it does not "
               "match is an error.")
GROUP_FILE = Option("group_file", Path | None, None,
                    "CSV of 'file,group' rows giving every image's group, for groupings a --group expression "
                    "cannot write (e.g. the segments of a video).")
FOLDS = Option("folds", int, 0, "Write K folds (foldNN_train/val/test): groups dealt into K test sets of about "
                                "equal size, val carved from the other groups. 0: no folds.")
FOLD_BY = Option("fold_by", str | None, None,
                 "Regular expression naming a coarser unit (a flight, a site; same rule as --group, images it does "
                 "not match form one unit): folds hold out whole units, train on the others and split the "
                 "held-out one into val (--val-fraction of it) and test by group. One fold per unit unless --folds.")
OPTIONS = (GROUP, GROUP_FILE, FOLDS, FOLD_BY)


@dataclass(frozen=True)
class SplitRule:
    """How a source carves val (and test, folds) out of its images."""

    val_fraction: float = 0.1
    seed: int = 0
    group: str | None = None  # regular expression over file names
    group_file: Path | None = None  # CSV file,group
    folds: int = 0
    fold_by: str | None = None  # regular expression naming the fold unit


@dataclass
class Carved:
    """Image ids per split (`train`, `val`, ... or `foldNN_train`, ...), the folds, the groups and the record."""

    parts: dict[str, list[Any]]
    folds: list[int] = field(default_factory=list)
    groups: dict[Any, str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def annotate(self, splits: dict[str, dict[str, int]]) -> None:
        """Add each split's group count to dataset.yaml's `splits` (with a grouping rule)."""
        if self.groups is None:
            return
        for name, ids in self.parts.items():
            if name in splits:
                splits[name]["groups"] = len({self.groups[i] for i in ids})


def compile_pattern(text: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as e:
        raise KdcliError(f"{option} '{text}': not a regular expression: {e}",
                         hint="quote it for the shell, e.g. --group '^(\\d+)_'") from None


def key_of(pattern: re.Pattern[str], name: str) -> str | None:
    """The group an expression gives a file name: the first capture group that took part, else the whole
    match; None when it does not match."""
    m = pattern.search(name)
    if m is None:
        return None
    return next((g for g in m.groups() if g is not None), m.group(0))


def read_group_file(path: Path) -> dict[str, str]:
    """file name -> group from CSV rows `file,group` (a `file,group` header, blank lines and `#` comments
    skipped; a path in the first column counts by its file name)."""
    if not path.is_file():
        raise KdcliError(f"{path}: group file not found", hint="CSV rows: file,group")
    table: dict[str, tuple[str, int]] = {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            header = n == 1 and [c.lower() for c in cells] == ["file", "group"]
            if not any(cells) or cells[0].startswith("#") or header:
                continue
            if len(cells) != 2 or not all(cells):
                raise KdcliError(f"{path}:{n}: expected 'file,group', got {','.join(row)!r}")
            name, group = Path(cells[0]).name, cells[1]
            if name in table and table[name][0] != group:
                raise KdcliError(f"{path}:{n}: {name} is given group '{group}', line {table[name][1]} gave "
                                 f"'{table[name][0]}'")
            table[name] = (group, n)
    if not table:
        raise KdcliError(f"{path}: no 'file,group' rows")
    return {name: g for name, (g, _) in table.items()}


def assign_groups(files: dict[Any, str], rule: SplitRule) -> tuple[dict[Any, str] | None, dict[str, Any]]:
    """(image id -> group, what to record) for `files` (image id -> path, matched by its file name); (None, {})
    without a grouping rule."""
    if rule.group and rule.group_file:
        raise KdcliError("--group and --group-file both given", hint="name the groups one way")
    if rule.group:
        pattern = compile_pattern(rule.group, "--group")
        groups = {}
        for i, path in files.items():
            key = key_of(pattern, Path(path).name)
            if key is None:
                raise KdcliError(f"{path}: file name does not match --group '{rule.group}'",
                                 hint="every image needs a group: widen the expression (alternatives with |) or "
                                      "give a --group-file")
            groups[i] = key
        return groups, {"group": rule.group, "unmatched": "error"}
    if rule.group_file:
        table = read_group_file(rule.group_file)
        groups = {}
        for i, path in files.items():
            if Path(path).name not in table:
                raise KdcliError(f"{path}: not listed in --group-file {rule.group_file}",
                                 hint="list every image: one 'file,group' row each")
            groups[i] = table[Path(path).name]
        unused = len(set(table) - {Path(p).name for p in files.values()})
        return groups, {"group_file": str(rule.group_file.resolve()), "group_file_rows_unused": unused}
    return None, {}


def fold_units(files: dict[Any, str], expression: str) -> dict[Any, str]:
    """image id -> fold unit by `--fold-by`; images it does not match share the unit `(unmatched)`."""
    pattern = compile_pattern(expression, "--fold-by")
    return {i: key_of(pattern, Path(p).name) or UNMATCHED_UNIT for i, p in files.items()}


def deal(sizes: dict[str, int], k: int, seed: int, what: str) -> list[list[str]]:
    """`sizes` (group -> images) dealt into k bins of about equal image counts: the largest group first, each to
    the lightest bin (seeded order among equal sizes); with k equal to the number of groups, one each in name
    order."""
    if k < 2:
        raise KdcliError(f"--folds {k}: need at least 2 folds")
    if k > len(sizes):
        raise KdcliError(f"--folds {k}: only {len(sizes)} {what} to deal into folds",
                         hint=f"use at most {len(sizes)} folds, or finer {what}")
    if k == len(sizes):
        return [[key] for key in sorted(sizes)]
    keys = sorted(sizes)
    random.Random(seed).shuffle(keys)
    keys.sort(key=lambda g: -sizes[g])
    bins: list[list[str]] = [[] for _ in range(k)]
    load = [0] * k
    for g in keys:
        b = min(range(k), key=lambda j: (load[j], j))
        bins[b].append(g)
        load[b] += sizes[g]
    return [sorted(b) for b in bins]


def _check_nested(groups: dict[Any, str], units: dict[Any, str], files: dict[Any, str]) -> None:
    """Every group inside one fold unit, else the first group that spans two, with a file of each."""
    first: dict[str, Any] = {}
    for i, g in groups.items():
        j = first.setdefault(g, i)
        if units[j] != units[i]:
            raise KdcliError(f"group '{g}' spans fold units '{units[j]}' ({Path(files[j]).name}) and "
                             f"'{units[i]}' ({Path(files[i]).name})",
                             hint="a group must lie inside one --fold-by unit: put the unit in the group's name")


def _check_declared(parts: dict[str, list[Any]], groups: dict[Any, str], files: dict[Any, str]) -> None:
    """Declared splits (a data.yaml's val, a --val JSON) must not share a group."""
    where: dict[str, tuple[str, Any]] = {}
    for split, ids in parts.items():
        for i in ids:
            s, j = where.setdefault(groups[i], (split, i))
            if s != split:
                raise KdcliError(f"group '{groups[i]}' straddles {s} ({files[j]}) and {split} ({files[i]})",
                                 hint="the dataset's own splits share a group: drop its val split to carve one "
                                      "by group, or re-split everything with --folds")


def carve(files: dict[Any, str], rule: SplitRule, declared: dict[str, list[Any]]) -> Carved:
    """Split the images `files` (image id -> path) by `rule`. `declared` holds the splits the dataset brings
    (at least `train`); val is carved from train when not declared; with folds every declared split is pooled."""
    groups, record = assign_groups(files, rule)
    what = "groups" if groups is not None else "images"
    by = (f"--group '{rule.group}'" if rule.group else f"--group-file {rule.group_file.name}" if rule.group_file
          else "image (no --group: near-duplicate images may straddle splits)")
    ids = [i for s in declared.values() for i in s]
    record = {**record, "seed": rule.seed, "val_fraction": rule.val_fraction}
    if not rule.folds and not rule.fold_by:
        parts = dict(declared)
        if "val" not in parts:
            parts["train"], parts["val"] = val_split(declared["train"], rule.val_fraction, rule.seed, groups=groups)
            text = f"val: a seeded {rule.val_fraction:.0%} of train carved by {by}"
        else:
            text = f"splits as the dataset declares them ({', '.join(declared)})"
            text += f", checked by {by}" if groups is not None else ""
        if groups is not None:
            _check_declared(parts, groups, files)
        carved = Carved(parts, groups=groups)
    else:
        keys = groups if groups is not None else {i: f"#{i}" for i in ids}
        pooled = list(declared) if len(declared) > 1 else []
        if rule.fold_by:
            units = fold_units(files, rule.fold_by)
            if groups is not None:
                _check_nested(groups, units, files)
            sizes = Counter(units[i] for i in ids)
            if len(sizes) < 2:
                raise KdcliError(f"--fold-by '{rule.fold_by}': every image falls in one unit "
                                 f"('{next(iter(sizes))}'), nothing to hold out",
                                 hint="the expression must tell the units apart, e.g. '^(Drone2)_' for one flight "
                                      "against the rest")
            bins = deal(dict(sizes), rule.folds or len(sizes), rule.seed, "--fold-by units")
            record.update(fold_by=rule.fold_by, units=dict(sorted(sizes.items())), val_from="held-out units")
        else:
            bins = deal(dict(Counter(keys[i] for i in ids)), rule.folds, rule.seed, what)
            record.update(val_from="train")
        parts = {}
        held_out = {}
        for k, b in enumerate(bins, 1):
            members = set(b)
            if rule.fold_by:
                held = [i for i in ids if units[i] in members]
                test, val = val_split(held, rule.val_fraction, rule.seed, salt=k, groups=groups)
                train = [i for i in ids if units[i] not in members]
                held_out[f"fold{k:02d}"] = sorted(members)
            else:
                test = [i for i in ids if keys[i] in members]
                train, val = val_split([i for i in ids if keys[i] not in members], rule.val_fraction, rule.seed,
                                       salt=k, groups=groups)
            for split, part in (("train", train), ("val", val), ("test", test)):
                parts[coco.split_name(split, k)] = part
        if rule.fold_by:
            record["held_out"] = held_out
            text = (f"{len(bins)} folds holding out --fold-by '{rule.fold_by}' units "
                    f"({', '.join(f'{u} {n}' for u, n in sorted(sizes.items()))} images): each trains on the other "
                    f"units; its held-out units give val ({rule.val_fraction:.0%}) and test, split by {by}")
        else:
            text = (f"{len(bins)} folds: test sets of disjoint {what} dealt by size, val a seeded "
                    f"{rule.val_fraction:.0%} of the rest, by {by}")
        if pooled:
            text += f"; declared splits pooled ({', '.join(pooled)})"
            record["pooled"] = pooled
        record["folds"] = len(bins)
        carved = Carved(parts, folds=list(range(1, len(bins) + 1)), groups=groups)
    if groups is not None:
        record["groups"] = len(set(groups.values()))
        record["split_groups"] = {name: sorted({groups[i] for i in part}) for name, part in carved.parts.items()
                                  if len({groups[i] for i in part}) <= LISTED}
        text += f" ({record['groups']} groups; none straddles splits)"
    carved.provenance = {"rule": text, **record}
    return carved
