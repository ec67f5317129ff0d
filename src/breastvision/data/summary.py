"""What a catalog holds, as numbers (:func:`summarize`) and as rich tables (:func:`print_summary`).

Everything comes from the catalog itself (image sizes and modes were read from file headers by the
readers), so a summary costs no image decoding beyond what reading the dataset needed.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

from breastvision.data.records import Catalog

#: Rows shown for long lists (skip reasons, conflicts); the rest is counted.
MAX_ROWS = 15


def _classes(catalog: Catalog) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Per class images and groups, per magnification images of each class, group statistics."""
    records = catalog.records
    class_of = [catalog.class_names[r.label] for r in records]
    groups_per_class: dict[str, set[str]] = defaultdict(set)
    labels_per_group: dict[str, set[str]] = defaultdict(set)
    magnifications: dict[int, Counter] = defaultdict(Counter)
    for record, name in zip(records, class_of, strict=True):
        groups_per_class[name].add(record.group)
        labels_per_group[record.group].add(name)
        if "magnification" in record.meta:
            magnifications[record.meta["magnification"]][name] += 1
    images_per_class = Counter(class_of)
    group_sizes = Counter(r.group for r in records)
    classes = {name: {"images": images_per_class[name], "groups": len(groups_per_class[name])}
               for name in catalog.class_names}
    groups = {
        "count": len(group_sizes),
        "size_min": min(group_sizes.values()),
        "size_median": float(statistics.median(group_sizes.values())),
        "size_max": max(group_sizes.values()),
        "mixed_label": sum(len(labels) > 1 for labels in labels_per_group.values()),
    }
    return classes, {f"{m}X": dict(c) for m, c in sorted(magnifications.items())}, groups


def _sizes(catalog: Catalog) -> dict[str, Any]:
    sizes = Counter((r.meta["width"], r.meta["height"]) for r in catalog.records if "width" in r.meta)
    return {
        "width": [min(w for w, _ in sizes), max(w for w, _ in sizes)] if sizes else None,
        "height": [min(h for _, h in sizes), max(h for _, h in sizes)] if sizes else None,
        "distinct": len(sizes),
        "most_common": [[w, h, n] for (w, h), n in sizes.most_common(3)],
    }


def _skipped(catalog: Catalog) -> dict[str, Any]:
    reasons = Counter(s.reason for s in catalog.skipped)
    first_path: dict[str, str] = {}
    for skip in catalog.skipped:
        first_path.setdefault(skip.reason, str(skip.path))
    return {
        "total": len(catalog.skipped),
        "reasons": [{"reason": reason, "count": n, "example": first_path[reason]}
                    for reason, n in reasons.most_common()],
    }


def _masks(catalog: Catalog) -> dict[str, int] | None:
    records = catalog.records
    if catalog.meta.get("format") != "busi" and not any(r.masks for r in records):
        return None
    per_image = [len(r.masks) for r in records]
    return {
        "total": sum(per_image),
        "images_with": sum(n > 0 for n in per_image),
        "images_without": sum(n == 0 for n in per_image),
        "max_per_image": max(per_image),
    }


def _near_duplicates(catalog: Catalog) -> dict[str, Any] | None:
    near = catalog.meta.get("near_duplicates")
    if near is None:
        return None
    return {
        "method": near["method"],
        "groups": len(near["groups"]),
        "images": sum(len(g) for g in near["groups"]),
        "label_conflicts": near["label_conflicts"],
    }


def summarize(catalog: Catalog) -> dict[str, Any]:
    """Counts per class / magnification / group, size and mode ranges, masks, near-duplicates, skips."""
    classes, magnifications, groups = _classes(catalog)
    return {
        "dataset": catalog.name,
        "format": catalog.meta.get("format"),
        "source": catalog.meta.get("source"),
        "root": str(catalog.root),
        "grouping": catalog.grouping,
        "read_options": catalog.meta.get("read_options", {}),
        "images": len(catalog.records),
        "classes": classes,
        "magnifications": magnifications,
        "groups": groups,
        "sizes": _sizes(catalog),
        "modes": dict(Counter(r.meta["mode"] for r in catalog.records if "mode" in r.meta)),
        "masks": _masks(catalog),
        "near_duplicates": _near_duplicates(catalog),
        "skipped": _skipped(catalog),
        "filtered_out": catalog.meta.get("filtered_out", {}),
        "notes": list(catalog.meta.get("notes", [])),
    }


def _table(title: str, *columns: str, numeric: bool = True) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for index, column in enumerate(columns):
        justify = "right" if numeric and index > 0 else "left"
        table.add_column(column, justify=justify, overflow="fold")
    return table


def _print_classes(s: dict[str, Any], console: Console) -> None:
    classes = _table("Classes", "class", "images", "groups")
    for name, row in s["classes"].items():
        classes.add_row(name, str(row["images"]), str(row["groups"]))
    classes.add_row("[bold]total", f"[bold]{s['images']}", f"[bold]{s['groups']['count']}")
    console.print(classes)
    if s["magnifications"]:
        names = list(s["classes"])
        mags = _table("Magnifications", "magnification", *names, "total")
        for mag, counts in s["magnifications"].items():
            mags.add_row(mag, *(str(counts.get(n, 0)) for n in names), str(sum(counts.values())))
        console.print(mags)


def _print_images(s: dict[str, Any], console: Console) -> None:
    g, sz = s["groups"], s["sizes"]
    images = _table("Groups and images", "property", "value", numeric=False)
    images.add_row(
        f"{s['grouping']} group size",
        f"min {g['size_min']} / median {g['size_median']:g} / max {g['size_max']}",
    )
    images.add_row("groups holding several labels", str(g["mixed_label"]))
    if sz["width"]:
        images.add_row("width (px)", f"{sz['width'][0]}–{sz['width'][1]}")
        images.add_row("height (px)", f"{sz['height'][0]}–{sz['height'][1]}")
        common = ", ".join(f"{w}×{h} ({n})" for w, h, n in sz["most_common"])
        images.add_row("distinct sizes", f"{sz['distinct']}: {common}")
    images.add_row("modes", ", ".join(f"{m} ({n})" for m, n in sorted(s["modes"].items())))
    if s["masks"]:
        m = s["masks"]
        images.add_row(
            "masks",
            f"{m['total']} on {m['images_with']} images (max {m['max_per_image']} per image); "
            f"{m['images_without']} images without a mask",
        )
    for what, n in s["filtered_out"].items():
        images.add_row("filtered out", f"{n} ({what})")
    console.print(images)


def _print_near_duplicates(near: dict[str, Any] | None, console: Console) -> None:
    if not near:
        return
    console.print(
        f"near-duplicate groups: {near['groups']} (holding {near['images']} images) by {near['method']}; "
        f"label conflicts: {len(near['label_conflicts'])}"
    )
    if near["label_conflicts"]:
        conflicts = _table("Label conflicts", "near-duplicate files", "label", numeric=False)
        for conflict in near["label_conflicts"][:MAX_ROWS]:
            for rel, label in conflict["files"].items():
                conflicts.add_row(rel, label)
            conflicts.add_section()
        console.print(conflicts)


def _print_skipped(skipped: dict[str, Any], console: Console) -> None:
    if not skipped["reasons"]:
        return
    table = _table("Skipped files", "reason", "files", "e.g.", numeric=False)
    for row in skipped["reasons"][:MAX_ROWS]:
        table.add_row(row["reason"], str(row["count"]), row["example"])
    hidden = skipped["reasons"][MAX_ROWS:]
    if hidden:
        table.add_row(f"… {len(hidden)} other reasons", str(sum(r["count"] for r in hidden)), "")
    console.print(table)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """Render :func:`summarize`'s result as tables; the last line says how many files were skipped."""
    console = console or Console()
    s = summary
    options = ", ".join(f"{k}={v}" for k, v in s["read_options"].items() if v is not None)
    console.rule(f"[bold]{s['dataset']}[/bold] ({s['format']})")
    console.print(f"root: {s['root']}")
    console.print(
        f"{s['images']} images, {len(s['classes'])} classes, {s['groups']['count']} groups "
        f"(grouping: {s['grouping']})" + (f"; read options: {options}" if options else "")
    )
    _print_classes(s, console)
    _print_images(s, console)
    _print_near_duplicates(s["near_duplicates"], console)
    for note in s["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    _print_skipped(s["skipped"], console)
    skipped = s["skipped"]
    console.print(
        f"[bold]{s['dataset']}:[/bold] {s['images']} images used, {skipped['total']} files skipped"
        + (f" ({len(skipped['reasons'])} distinct reasons, listed above)" if skipped["total"] else "")
    )
