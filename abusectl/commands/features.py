"""List the feature bits of the header and of the loaded module."""

from __future__ import annotations

import argparse
import json

import abuse
from abuse import uapi
from abuse._exceptions import AbuseError
from abuse.control import ModuleFeatures
from abusectl.devices import open_control
from abusectl.output import table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl features``."""
    parser.add_argument("--json", action="store_true", help="one JSON object")


def module_features() -> ModuleFeatures:
    """The loaded module's VERSION answer; AbuseError if it cannot be asked."""
    with open_control() as control:
        return control.features()


def version_text() -> str:
    """``abusectl --version``: the library, its header and the loaded module."""
    text = f"abusectl {abuse.__version__} (uapi {uapi.ABUSE_VERSION})"
    try:
        module = module_features()
    except AbuseError as err:
        return f"{text}\nmodule: unknown ({err})"
    return f"{text}\nmodule: uapi {module.version}"


def _rows(module: ModuleFeatures) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for kind, table_, have in (
        ("disk", uapi.DISK_FEATURES, module.features),
        ("xfer", uapi.XFER_FEATURES, module.xfer_features),
    ):
        for name, bit in table_.items():
            rows.append(
                {
                    "kind": kind,
                    "name": uapi.feature_name(name),
                    "macro": name,
                    "bit": bit,
                    "module": bool(have & bit),
                }
            )
    return rows


def run(args: argparse.Namespace) -> int:
    """Print each feature, whether the module has it, and the versions."""
    module = module_features()
    rows = _rows(module)
    if args.json:
        record = {
            "library": {"version": abuse.__version__, "uapi": uapi.ABUSE_VERSION},
            "module": {
                "uapi": module.version,
                "max_batch": module.max_batch,
                "features": uapi.feature_names(module.features, uapi.DISK_FEATURES),
                "xfer_features": uapi.feature_names(module.xfer_features, uapi.XFER_FEATURES),
            },
            "features": rows,
        }
        print(json.dumps(record, indent=2))
        return 0
    print(f"library uapi {uapi.ABUSE_VERSION}, {module.describe()[4:]}, max batch {module.max_batch}")
    cells = [
        [str(row["kind"]), str(row["name"]), str(row["macro"]), "yes" if row["module"] else "no"]
        for row in rows
    ]
    for line in table(("KIND", "NAME", "MACRO", "MODULE"), cells):
        print(line)
    return 0
