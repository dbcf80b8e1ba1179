"""``simspec profiles``: list the bundled profiles with their source and device."""

from __future__ import annotations

import click

from simspec.profile import bundled_profiles, load_profile


@click.command("profiles")
def profiles() -> None:
    """List the bundled profiles (name, source, device, dtype, target model).

    `source` is `published` (a fit published by others), `measured` (by `simspec calibrate`) or
    `analytic` (a roofline estimate from datasheet figures, not a measurement).
    """
    rows = [("name", "source", "device", "dtype", "target model")]
    for name, path in bundled_profiles().items():
        p = load_profile(path)
        rows.append((name, p.source, str(p.meta.get("device", "?")), str(p.meta.get("dtype", "?")),
                     str(p.models.get("target", {}).get("name", "?"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
