"""The README's configuration tables list exactly the variables the code reads."""

import re
from pathlib import Path

from aimesh.devstack.stack import StackSettings
from aimesh.settings import GatewaySettings, IngestSettings, NotifierSettings, WorkerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def variables_read() -> set[str]:
    names = set()
    for cls in (IngestSettings, WorkerSettings, NotifierSettings, GatewaySettings, StackSettings):
        prefix = cls.model_config["env_prefix"]
        names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    documented = set(re.findall(r"^\| `(AIMESH_[A-Z_]+)` \|", README, flags=re.MULTILINE))
    assert documented == variables_read()
