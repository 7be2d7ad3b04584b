"""Which categories (product lines) a fleet run covers, and each one's ``data`` parameters.

A fleet is the ``dfd`` chain once per category. Every category shares the project's parameters
except ``data``: each gets the global ``data`` block with its own ``category`` (and, for the
built-in textile source, its own disjoint block of the package images), plus any overrides from
``fleet.data_overrides.<category>``. Plain dictionaries in, plain dictionaries out: the Kedro
wiring lives in ``pipelines/fleet``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from fsad_pipeline.data.layouts import list_categories

#: Category names become Kedro namespaces and dataset-name prefixes: no dots, no spaces.
_CATEGORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
#: ``<data.category>_<i>`` is textile pseudo-category ``i`` (block ``i`` of the package images).
_TEXTILE_PART = re.compile(r"_(\d+)$")


def _deep_merge(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def fleet_categories(data: Mapping[str, Any], fleet: Mapping[str, Any]) -> list[str]:
    """``fleet.categories`` resolved to a list of names.

    A list is taken as given, and so is a ``+``-separated string (``--params
    fleet.categories=screw+plate``: ``kedro run --params`` cuts ``[screw,plate]`` at the comma). ``auto`` lists every category folder under ``data.root`` for the
    ``mvtec`` and ``folder`` sources; the ``textile`` source has no folders to list (its images come
    from a package), so ``auto`` gives ``fleet.textile_parts`` pseudo-categories
    ``<data.category>_0``, ``_1``, ... that share no image.
    """
    wanted = fleet.get("categories", "auto")
    if wanted == "auto":
        if data["source"] == "textile":
            parts = int(fleet.get("textile_parts", 2))
            if parts < 1:
                raise ValueError(f"fleet.textile_parts must be >= 1, got {parts}")
            names = [f"{data['category']}_{i}" for i in range(parts)]
        else:
            names = list_categories(data["source"], data["root"])
    elif isinstance(wanted, str):  # "screw+plate": Kedro's --params splits lists at their commas
        names = [name.strip() for name in wanted.split("+") if name.strip()]
    else:
        names = [str(name) for name in wanted]
    if not names:
        raise ValueError("fleet.categories is empty: name at least one category (or use auto)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"fleet.categories lists {', '.join(duplicates)} more than once")
    bad = [name for name in names if not _CATEGORY_NAME.match(name)]
    if bad:
        raise ValueError(
            f"fleet category names become Kedro namespaces and may only hold letters, digits, '_' and '-': {bad}"
        )
    return names


def category_data(data: Mapping[str, Any], fleet: Mapping[str, Any], category: str) -> dict[str, Any]:
    """The ``data`` parameters of one category: the global block, its name, its overrides."""
    result = copy.deepcopy(dict(data))
    result["category"] = category
    if data["source"] == "textile":
        match = _TEXTILE_PART.search(category)
        if match and category[: match.start()] == data["category"]:
            result.setdefault("textile", {})
            result["textile"] = {**(result["textile"] or {}), "part": int(match.group(1))}
    overrides = (fleet.get("data_overrides") or {}).get(category) or {}
    return _deep_merge(result, overrides)


def fleet_plan(parameters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{category: data parameters}`` in fleet order, from the whole parameter dictionary."""
    data = parameters["data"]
    fleet = parameters.get("fleet") or {}
    names = fleet_categories(data, fleet)
    unknown = sorted(set(fleet.get("data_overrides") or {}) - set(names))
    if unknown:
        raise ValueError(f"fleet.data_overrides names categories outside the fleet: {unknown} (fleet: {names})")
    return {name: category_data(data, fleet, name) for name in names}
