"""The gateway's web page (services/gateway/static), checked without a browser: it works offline (no file from
elsewhere), never turns text into markup, labels every control, carries every test id the browser test looks for,
ships in the package and is what the gateway serves at ``/``. tests/integration/test_gateway_browser.py runs it."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from aimesh.settings import GatewaySettings

REPO_ROOT = Path(__file__).resolve().parents[2]
STATIC = REPO_ROOT / "services" / "gateway" / "static"
BROWSER_TEST = REPO_ROOT / "tests" / "integration" / "test_gateway_browser.py"


class Page(HTMLParser):
    """What the tests need of index.html: each element's tag and attributes, and each label's target."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def page() -> Page:
    parsed = Page()
    parsed.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    return parsed


@pytest.fixture(scope="module")
def script() -> str:
    return (STATIC / "app.js").read_text(encoding="utf-8")


def test_the_page_loads_only_its_own_files(page: Page, script: str) -> None:
    assets = [a.get("src") or a.get("href") for tag, a in page.elements if tag in ("script", "link", "img")]
    assert assets, "index.html loads no script or style?"
    for asset in assets:
        assert asset and "//" not in asset and ":" not in asset, f"{asset} is not a file of the page"
        assert (STATIC / asset).is_file(), f"index.html loads {asset}, which is not in {STATIC}"
    assert not re.search(r"https?://", script + (STATIC / "style.css").read_text()), "a URL of another site"


def test_the_script_never_turns_text_into_markup(script: str) -> None:
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("//"))
    found = re.findall(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function", code)
    assert not found, f"app.js writes markup or code from strings: {found}"


def test_every_control_has_a_label(page: Page) -> None:
    labelled = {a.get("for") for tag, a in page.elements if tag == "label"}
    controls = [a.get("id") for tag, a in page.elements if tag in ("input", "select", "textarea")]
    assert controls and all(c in labelled for c in controls), f"unlabelled: {set(controls) - labelled}"


def test_every_test_id_the_browser_test_uses_is_on_the_page(page: Page, script: str) -> None:
    on_page = {a["data-testid"] for _, a in page.elements if a.get("data-testid")}
    on_page |= set(re.findall(r'setAttribute\("data-testid", "([\w-]+)"\)', script))
    used = set(re.findall(r'get_by_test_id\("([\w-]+)"\)|data-testid="([\w-]+)"', BROWSER_TEST.read_text()))
    wanted = {name for pair in used for name in pair if name}
    assert wanted and wanted <= on_page, f"the browser test looks for {sorted(wanted - on_page)}, not on the page"


def test_the_package_ships_every_file_of_the_page() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["aimesh.gateway"]
    files = [f.relative_to(STATIC.parent).as_posix() for f in STATIC.iterdir()]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files), (files, patterns)


@pytest.mark.skipif(shutil.which("node") is None, reason="node checks the script's syntax; it is not installed")
def test_the_script_is_valid_javascript() -> None:
    checked = subprocess.run(["node", "--check", str(STATIC / "app.js")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    ("path", "media_type", "marker"),
    [
        ("/", "text/html", 'id="submit-form"'),
        ("/app.js", "javascript", "new EventSource"),
        ("/style.css", "text/css", ".problem"),
    ],
)
async def test_the_gateway_serves_the_page_at_its_root(path: str, media_type: str, marker: str) -> None:
    from aimesh.gateway.app import create_app

    app = create_app(GatewaySettings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        response = await client.get(path)
    assert response.status_code == 200 and media_type in response.headers["content-type"], response.headers
    assert marker in response.text
