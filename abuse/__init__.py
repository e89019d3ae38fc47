"""abuse: a Linux block device served from user space, in Python."""

from __future__ import annotations

from abuse._exceptions import (
    AbuseError,
    AbusePermissionError,
    ControlDeviceMissing,
    DiskBusy,
    DiskNotFound,
    FeatureMissing,
    InvalidRequest,
)
from abuse.backends.base import Backend
from abuse.control import Control, DiskConfig, DiskInfo, ModuleFeatures
from abuse.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AbuseError",
    "AbusePermissionError",
    "Backend",
    "Control",
    "ControlDeviceMissing",
    "DiskBusy",
    "DiskConfig",
    "DiskInfo",
    "DiskNotFound",
    "FeatureMissing",
    "InvalidRequest",
    "ModuleFeatures",
    "Worker",
    "__version__",
]
