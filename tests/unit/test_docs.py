"""The configuration reference (docs/configuration.md) against the settings classes and the CLI, and the links of the
README and docs/ against the files and headings they point to."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from aimesh.client.cli import main as cli
from aimesh.devstack.stack import StackSettings
from aimesh.settings import (
    RESERVED_KAFKA_PROPERTIES,
    GatewaySettings,
    IngestSettings,
    NotifierSettings,
    WorkerSettings,
)
from benchmarks import sections as bench_sections
from benchmarks.common import Section, split_sections, write_markdown

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
SERVICES: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings,
    "worker": WorkerSettings,
    "notifier": NotifierSettings,
    "gateway": GatewaySettings,
}


def rows(first_column: str) -> list[list[str]]:
    """The cells of every table row of the reference whose first cell matches ``first_column``."""
    pattern = re.compile(rf"^\| `{first_column}` \|.*\|$", flags=re.MULTILINE)
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in pattern.findall(CONFIGURATION)]


def rendered(default: Any) -> str:
    """A default as the reference writes it."""
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if isinstance(default, Path):
        return f"`./{default.relative_to(ROOT)}`"
    if default is None or default == "":
        return "empty"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`"


def documented_defaults(used_by: str, default: str) -> dict[str, str]:
    """``ingest `10.0`, worker `20.0``` (one default per service) or one default for every service named."""
    services = list(SERVICES) if used_by == "all" else [s.strip() for s in used_by.split(",")]
    per_service = dict(re.findall(r"(\w+) (`[^`]*`|empty)", default))
    if per_service:
        assert set(per_service) == set(services), default
        return per_service
    return dict.fromkeys(services, default)


def test_every_service_setting_is_documented_with_its_default_and_nothing_else() -> None:
    table = {cells[0].strip("`"): cells for cells in rows("AIMESH_[A-Z_]+") if not cells[0].startswith("`AIMESH_STA")}
    fields = {f"AIMESH_{field}".upper() for cls in SERVICES.values() for field in cls.model_fields}
    assert set(table) == fields
    for variable, (_, used_by, default, meaning) in table.items():
        field = variable.removeprefix("AIMESH_").lower()
        for service, documented in documented_defaults(used_by, default).items():
            assert field in SERVICES[service].model_fields, f"{variable}: {service} has no such setting"
            assert documented == rendered(SERVICES[service].model_fields[field].default), (variable, service)
        assert meaning, variable


def test_every_stack_setting_is_documented_with_its_default_and_nothing_else() -> None:
    table = {cells[0].strip("`"): cells for cells in rows("AIMESH_STACK_[A-Z_]+")}
    assert set(table) == {f"AIMESH_STACK_{field}".upper() for field in StackSettings.model_fields}
    for variable, (_, default, meaning) in table.items():
        field = StackSettings.model_fields[variable.removeprefix("AIMESH_STACK_").lower()]
        assert default == rendered(field.default), variable
        assert meaning, variable


def test_the_reserved_kafka_properties_are_exactly_those_the_code_refuses() -> None:
    section = CONFIGURATION.split("## Kafka properties aimesh sets itself", 1)[1].split("\n## ", 1)[0]
    listed = section.split(":\n\n", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`([a-z.]+)`", listed)) == RESERVED_KAFKA_PROPERTIES
    with pytest.raises(ValueError, match="partition.assignment.strategy"):
        IngestSettings(kafka_config='{"partition.assignment.strategy": "range"}').kafka_client_config()


def test_every_cli_option_read_from_the_environment_is_documented_with_its_default() -> None:
    table = {cells[1].strip("`"): cells for cells in rows("--[a-z-]+") if cells[1]}
    options = {p.envvar: p for p in cli.params if isinstance(p, click.Option) and p.envvar}
    assert set(table) == set(options)
    context = click.Context(cli)
    for variable, (flag, _, default, _) in table.items():
        option = options[variable]
        assert flag.strip("`") in option.opts, variable
        value = option.get_default(context, call=False)
        # A flag's default is False; an option without one has click's UNSET marker (None in older clicks).
        expected = f"`{value}`" if isinstance(value, str) else "off" if value is False else "none"
        assert default == expected, variable


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_links_point_to_files_and_headings_that_exist(path: Path) -> None:
    text = path.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL: not checked here
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor:
            assert anchor in anchors(linked.read_text()), f"{path.name}: {target}"


def test_design_notes_link_nothing_outside_the_repository() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    assert not re.search(r"https?://", design)
    for target in [*LINK.findall(design), *re.findall(r"`(\.\./[^`]*)`", design)]:
        assert (ROOT / "docs" / target.partition("#")[0]).resolve().is_relative_to(ROOT), target


def test_make_bench_keeps_the_hand_written_sections_of_the_benchmarks_page(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    sections = split_sections(page)
    assert set(sections) <= set(bench_sections.ORDER), "a section make bench would move to the end"
    path = tmp_path / "benchmarks.md"
    path.write_text(page)
    measured = Section(bench_sections.ORDER[0], "setup", "new figures")
    write_markdown(path, [measured], "python benchmarks/run.py --only throughput", bench_sections.ORDER)
    rewritten = split_sections(path.read_text())
    assert list(rewritten) == list(sections)
    assert rewritten[bench_sections.HISTORY] == sections[bench_sections.HISTORY]
    assert "new figures" in rewritten[bench_sections.ORDER[0]]


def test_the_code_layout_has_a_line_for_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Code layout", 1)[1].split("```", 2)[1]
    listed, folder = set(), ""
    for line in block.splitlines():
        if re.match(r"[\w./]+/ ", line):
            folder = line.split()[0]
        elif match := re.match(r"  (\w+\.py) ", line):
            listed.add(folder + match[1])
    folders = [ROOT / "src" / "aimesh", ROOT / "src" / "aimesh" / "client", ROOT / "src" / "aimesh" / "devstack"]
    folders += sorted(p for p in (ROOT / "services").iterdir() if p.is_dir())
    modules = {
        str(module.relative_to(ROOT))
        for folder in folders
        for module in folder.glob("*.py")
        if module.name != "__init__.py"
    }
    assert listed == modules
