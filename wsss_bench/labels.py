"""One canonical label per cell, and every other spelling resolved to it.

A cell's label names its map sources and its refiner with the parameters that differ from
their defaults (``amecam+mg+cldf``, ``gradcam[layer=layer3]+threshold``).  Two spellings of
one computation must not give two labels: ``--cam amecam --method cldf`` trains exactly what
``--cam amecam+mg --method cldf`` trains (CLDF adds the MG source itself), and
``gradcam[layer=layer4]`` is ``gradcam`` (``layer4`` is the default).  So a refiner may
declare the sources it adds (:meth:`Refiner.implied_sources`), the planner labels the cell
with them, and every command that takes a label (``report --reference``, ``export-masks
--method``, ``figures``) reads the user's spelling through :func:`canonical_method` and
compares canonical forms, so runs stored under an older spelling are found too.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from wsss_bench.errors import UserError
from wsss_bench.spec import format_spec, parse_sources


def canonical_params(inst: Any) -> tuple:
    """The parameters of a plugin instance that differ from its defaults, sorted, hashable."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                        for k, v in inst.p.items() if v != inst.params.get(k)))


def _one(host: Any, kind: str, spec: Any) -> tuple[str, tuple, Any]:
    combos = spec.expand()
    if len(combos) != 1:
        raise UserError(f"'{spec.text}' is a grid ({len(combos)} cells), not one method; name one value per parameter")
    inst = host.get(kind, spec.name)(**combos[0])
    return spec.name, canonical_params(inst), inst


def complete_sources(host: Any, refiner: Any, sources: Sequence[tuple[str, tuple]]) -> tuple[tuple[str, tuple], ...]:
    """``sources`` plus the map sources ``refiner`` (an instance) adds by itself, canonical."""
    names = [name for name, _ in sources]
    out = list(sources)
    for extra in refiner.implied_sources(names):
        if extra not in names:
            inst = host.get("cams", extra)()
            out.append((extra, canonical_params(inst)))
    return tuple(out)


def canonical_method(host: Any, label: str) -> str:
    """The canonical label of the cell ``label`` names (any accepted spelling).

    Refused with one sentence when a plugin or parameter is unknown (the plugin's own error)."""
    text = str(label).strip()
    combos = parse_sources(text)
    if len(combos) != 1:
        raise UserError(f"'{label}' names several methods (a top-level comma); name one")
    parts = combos[0]
    ref_name, ref_params, ref = _one(host, "refiners", parts[-1])
    sources = [_one(host, "cams", s)[:2] for s in parts[:-1]]
    if sources and not ref.needs_cam:
        raise UserError(f"'{label}': refiner '{ref_name}' uses no map source; its label is '{format_spec(ref_name, dict(ref_params))}'")
    sources = complete_sources(host, ref, sources) if sources else ()
    refiner = format_spec(ref_name, dict(ref_params))
    if not sources:
        return refiner
    return "+".join(format_spec(n, dict(p)) for n, p in sources) + "+" + refiner


def resolve_method(host: Any, typed: str, stored: Iterable[str], what: str = "--method") -> str:
    """The stored label that ``typed`` names: equal text, else equal canonical form.

    ``stored`` are the labels a run holds; a label stored under an older spelling still matches.
    No match is one sentence listing what the run holds."""
    stored = list(dict.fromkeys(map(str, stored)))
    if typed in stored:
        return typed
    try:
        want = canonical_method(host, typed)
    except UserError as err:
        raise UserError(f"{what} {typed}: {str(err).rstrip('.')}; the results hold: {', '.join(stored) or 'nothing'}") from None
    for label in stored:
        try:
            if canonical_method(host, label) == want:
                return label
        except Exception:  # a stored label of a plugin that is not installed here: cannot match
            continue
    raise UserError(f"{what} {typed}: the results hold no such method (canonical label {want}); "
                    f"they hold: {', '.join(stored) or 'nothing'}")


def display_labels(host: Any, methods: Sequence[str]) -> dict[str, str]:
    """Row labels for a table of ``methods``: in a grid over a parameter every row shows that
    parameter's value, the default included (``gradcam[layer=layer4]+threshold`` beside
    ``gradcam[layer=layer3]+threshold``, not a bare ``gradcam+threshold``).

    Methods are grouped by their plugin names in order; within a group, a parameter that any
    member sets is shown on every member.  A label that does not parse (a ``--label`` suffix, a
    plugin not installed here) is shown as it is."""
    parsed: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for m in methods:
        try:
            combo = parse_sources(str(m))
            if len(combo) != 1:
                continue
            parsed[m] = [(s.name, {k: v[0] for k, v in s.grid.items() if len(v) == 1}) for s in combo[0]]
        except UserError:
            continue
    groups: dict[tuple[str, ...], list[str]] = {}
    for m, parts in parsed.items():
        groups.setdefault(tuple(n for n, _ in parts), []).append(m)
    out = {m: m for m in methods}
    for names, members in groups.items():
        if len(members) < 2:
            continue
        shown = [set().union(*(parsed[m][i][1] for m in members)) for i in range(len(names))]
        for m in members:
            texts = []
            for i, (name, params) in enumerate(parsed[m]):
                kind = "refiners" if i == len(names) - 1 else "cams"
                try:
                    defaults = dict(host.get(kind, name).params)
                except Exception:
                    defaults = {}
                full = {k: params.get(k, defaults.get(k)) for k in shown[i] if k in params or k in defaults}
                texts.append(format_spec(name, full))
            out[m] = "+".join(texts)
    return out
