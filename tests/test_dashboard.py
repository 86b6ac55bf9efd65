"""The dashboard in a real headless Chromium: it loads, draws the seeded mesh, shows a
broken pair as broken, shows a host's fields as a table, and charts its metrics and
the firing alarms from a real collector that the browser never talks to (the
controller proxies it under /v1/monitoring; the collector allows no other origin).
Screenshots go to artifacts/dashboard*.png (the page, and each panel)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cladnet.keys import generate_keypair
from cladnet.metrics import Batch
from lab.api import make_network, make_token
from lab.components import (
    ADMIN_TOKEN,
    MQTT_ADMIN_PASSWORD,
    REPO,
    Collector,
    Controller,
    Etcd,
    Mosquitto,
    free_port,
)
from lab.monitoring import publish, publish_health

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.skip("needs Debian chromium and chromium-driver (run deploy/setup.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,2000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(
    etcd: Etcd, mosquitto: Mosquitto, make_collector, tmp_path: Path, monkeypatch
) -> Iterator[tuple[Controller, Mosquitto, Collector]]:
    """A controller whose dashboard charts from a collector that allows no browser
    origin (no CORS): only the controller's proxy can ask it."""
    ctl = Controller(etcd_url=etcd.url, state_dir=tmp_path / "ctl", port=free_port())
    monkeypatch.delenv("CLADNET_CORS_ORIGINS", raising=False)
    collector = make_collector()
    ctl.extra_env = {
        "CLADNET_COLLECTOR_URL": collector.url,
        "CLADNET_COLLECTOR_TOKEN": collector.token,
        "CLADNET_MQTT_URL": mosquitto.url,
        "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
    }
    ctl.start()
    try:
        yield ctl, mosquitto, collector
    finally:
        ctl.stop()


def _publish_metrics(ctl: Controller, broker: Mosquitto, host: dict) -> None:
    """A few batches of one host with three interfaces, the WireGuard one among them."""
    with ctl.client(token=host["credential"]) as c:
        r = c.post(f"/v1/hosts/{host['host_id']}/metrics-credentials")
    r.raise_for_status()
    creds, now = r.json(), time.time()
    for seq in range(4):
        b = Batch(network="web", host="vm3", seq=seq, ts=now - 40 + 10 * seq, interval=10.0)
        b.add("cpu_usage_ratio", 0.1 * seq)
        b.add("memory_usage_ratio", 0.5)
        # Different shapes, so the chart visibly changes with the picked interface.
        b.add("network_receive_bytes_total", 1000.0 * seq * seq, interface="cl-web")
        b.add("network_receive_bytes_total", 5000.0 + 1000 * seq, interface="eth0")
        b.add("network_receive_bytes_total", 10.0, interface="lo")
        # Per-peer latency over time, for the host panel's latency chart.
        b.add("wireguard_peer_latency_seconds", 0.001 * (1 + seq), peer="vm2")
        b.add("wireguard_peer_latency_seconds", 0.040, peer="vm1")
        asyncio.run(publish(broker, creds, creds["topic"], b.encode()))


def _seed(ctl: Controller, broker: Mosquitto) -> dict[str, dict]:
    with ctl.client() as admin:
        make_network(admin, "web", cidr="10.70.0.0/24")
        token = make_token(admin, "web")
    hosts = {}
    for name, cloud in (("vm1", "aws"), ("vm2", "aws"), ("vm3", "gcp")):
        with httpx.Client(base_url=ctl.url, timeout=10) as c:
            hosts[name] = c.post(
                "/v1/join",
                json={
                    "token": token,
                    "hostname": name,
                    "public_key": generate_keypair()[1],
                    "labels": {"cloud": cloud, "region": "r1"},
                },
            ).json()
    ok = {"handshake_age_s": 4, "latency_ms": 1.5}
    reports = {
        "vm1": {"vm2": ok, "vm3": {"handshake_age_s": 400}},
        "vm2": {"vm1": ok, "vm3": ok},
        "vm3": {"vm1": {"handshake_age_s": 400}, "vm2": ok},
    }
    for name, peers in reports.items():
        with ctl.client(token=hosts[name]["credential"]) as c:
            c.post(f"/v1/hosts/{hosts[name]['host_id']}/heartbeat", json={}).raise_for_status()
        publish_health(ctl, broker, "web", hosts[name], name, peers)
    return hosts


def test_the_dashboard_draws_the_mesh_a_broken_pair_and_charts(
    browser, dashboard: tuple[Controller, Mosquitto, Collector]
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    controller, broker, collector = dashboard
    hosts = _seed(controller, broker)
    with collector.client() as c:  # fires on vm3's cpu (0.3 in its last batch)
        rule = {
            "name": "hot",
            "metric": "cpu_usage_ratio",
            "network": "web",
            "op": ">",
            "threshold": 0.05,
        }
        c.post("/v1/alarms", json=rule).raise_for_status()
    _publish_metrics(controller, broker, hosts["vm3"])
    # A one-way rule: vm1 may open connections to vm2, not the other way; vm3 is cut off.
    with controller.client() as admin:
        one_way = {"rules": [{"src": "host:vm1", "dst": "host:vm2"}]}
        admin.put("/v1/networks/web/policy", json=one_way).raise_for_status()
    # The page redraws its panels every 5 s: a read that meets a replaced element retries.
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"{controller.url}/ui/")
    # A wrong token is refused with a message.
    wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys("cla_wrong.token")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda d: "unauthorized" in d.find_element(By.ID, "error").text)
    box = browser.find_element(By.ID, "token")
    box.clear()
    box.send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()

    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "circle[data-host]")) == 3)
    browser.get_log("browser")  # drained: the wrong token's 401 was meant to be logged
    names = {c.get_attribute("data-host") for c in browser.find_elements(By.CSS_SELECTOR, "circle")}
    assert names == {"vm1", "vm2", "vm3"}
    assert all(
        c.get_attribute("data-up") == "true"
        for c in browser.find_elements(By.CSS_SELECTOR, "circle")
    )
    states = {
        e.get_attribute("data-pair"): e.get_attribute("data-state")
        for e in browser.find_elements(By.CSS_SELECTOR, "line[data-pair]")
    }
    assert states == {"vm1|vm2": "ok", "vm1|vm3": "broken", "vm2|vm3": "ok"}
    assert "web: 3 hosts" in browser.find_element(By.ID, "mesh-title").text

    # The host panel opens on a click, with a chart per metric drawn from the collector;
    # the network chart picks the WireGuard interface (cl-web) among the host's three.
    browser.find_element(By.CSS_SELECTOR, "circle[data-host='vm3']").click()
    wait.until(lambda d: "vm3" in d.find_element(By.ID, "host-panel").text)
    # Fields as a table of names and values, not JSON.
    rows = wait.until(
        lambda d: {
            r.get_attribute("data-field"): r.find_element(By.TAG_NAME, "td").text
            for r in d.find_elements(By.CSS_SELECTOR, "#host-fields tr")
        }
    )
    assert rows["overlay IP"].startswith("10.70.0.")
    assert rows["labels"] == "cloud=gcp, region=r1"
    assert rows["last seen"].endswith("s ago")
    assert wait.until(lambda d: "{" not in d.find_element(By.ID, "host-fields").text)
    peers = wait.until(
        lambda d: {
            r.get_attribute("data-peer"): r.text
            for r in d.find_elements(By.CSS_SELECTOR, "#host-peers tr[data-peer]")
        }
    )
    assert peers["vm2"].split()[-2:] == ["1.5", "ms"] and "none" not in peers["vm2"]
    net_path = "svg.chart[data-metric='network_receive_bytes_total'] path"

    def drawn(d) -> str | None:
        paths = d.find_elements(By.CSS_SELECTOR, net_path)
        return paths[0].get_attribute("d") if paths else None

    wg_line = wait.until(drawn)
    assert "ambiguous" not in browser.find_element(By.ID, "host-panel").text

    def attribute(css: str, name: str) -> str:
        return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, css).get_attribute(name))

    for metric in ("cpu_usage_ratio", "memory_usage_ratio"):
        assert int(attribute(f"svg.chart[data-metric='{metric}']", "data-points")) >= 2

    def picked(d) -> tuple[list[str], str]:
        picker = Select(d.find_element(By.ID, "iface-picker"))
        return [o.text for o in picker.options], picker.first_selected_option.text

    assert wait.until(picked) == (["cl-web", "eth0", "lo"], "cl-web")
    # Another interface: the chart is redrawn from that interface's series.
    wait.until(
        lambda d: (
            Select(d.find_element(By.ID, "iface-picker")).select_by_visible_text("eth0") or True
        )
    )
    wait.until(lambda d: drawn(d) not in (None, wg_line))
    assert wait.until(picked)[1] == "eth0"
    # Latency per peer over time: one line per peer the host reports.
    latency = "svg.chart[data-metric='wireguard_peer_latency_seconds'] path"
    lines = wait.until(
        lambda d: {
            p.get_attribute("data-series") for p in d.find_elements(By.CSS_SELECTOR, latency)
        }
    )
    assert lines == {"vm1", "vm2"}
    # The firing alarm, with its rule, through the controller's proxy: in the host's
    # panel and in the list of every alarm firing.
    for css in ("#host-alarms li[data-rule='hot']", "#alarms li[data-rule='hot']"):
        text = wait.until(lambda d, css=css: d.find_element(By.CSS_SELECTOR, css).text)
        assert "web/vm3" in text and "(cpu_usage_ratio > 0.05)" in text, text

    # A pair: each direction's health, path and the policy rule that allows or blocks it.
    _click(wait, "line[data-hit='vm1|vm2']")
    rows = wait.until(
        lambda d: {
            r.get_attribute("data-direction"): [
                td.text for td in r.find_elements(By.TAG_NAME, "td")
            ]
            for r in d.find_elements(By.CSS_SELECTOR, "#pair-fields tr[data-direction]")
        }
    )
    assert rows["forward"][:2] == ["vm1 → vm2", "ok"] and rows["forward"][3] == "1.5 ms"
    assert rows["forward"][4] in ("private", "direct") or rows["forward"][4].startswith("relayed")
    assert rows["forward"][5] == "allowed by rule 0 (host:vm1 → host:vm2 any)"
    assert rows["reverse"][5] == "default deny: no rule allows it"
    assert "policy version 1" in browser.find_element(By.ID, "pair-panel").text
    # A pair the policy cuts off both ways is blocked (no tunnel expected), not broken.
    _click(wait, "line[data-hit='vm1|vm3']")
    cut = wait.until(
        lambda d: [
            [td.text for td in r.find_elements(By.TAG_NAME, "td")]
            for r in d.find_elements(By.CSS_SELECTOR, "#pair-fields tr[data-direction]")
            if "vm3" in r.text
        ]
    )
    assert [row[1] for row in cut] == ["blocked", "blocked"], cut
    assert "not in each other's peer lists" in browser.find_element(By.ID, "pair-panel").text
    _click(wait, "line[data-hit='vm1|vm2']")  # the picture shows the one-way pair
    wait.until(lambda d: "vm1 ↔ vm2" in d.find_element(By.ID, "pair-panel").text)
    # Nothing failed in the page (a CORS refusal or a failed fetch would be logged).
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    browser.save_screenshot(str(artifacts / "dashboard.png"))
    assert (artifacts / "dashboard.png").stat().st_size > 10_000
    for panel in ("mesh-section", "pair-panel", "host-panel", "alarms-panel"):  # one per panel
        shot = artifacts / f"dashboard-{panel}.png"
        browser.find_element(By.ID, panel).screenshot(str(shot))
        assert shot.stat().st_size > 1_000


def test_the_ui_needs_no_token_to_load_but_the_api_does(controller: Controller) -> None:
    page = httpx.get(f"{controller.url}/ui/", timeout=10)
    assert page.status_code == 200 and '<svg id="mesh"' in page.text
    assert httpx.get(f"{controller.url}/ui/app.js", timeout=10).status_code == 200
    assert httpx.get(f"{controller.url}/ui/config.json", timeout=10).json() == {"monitoring": False}
    assert httpx.get(f"{controller.url}/v1/networks", timeout=10).status_code == 401
    assert Path(REPO / "controller" / "static" / "index.html").exists()


def _click(wait, css: str) -> None:
    """Click what ``css`` finds, again if the list was redrawn under the click."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked(d) -> bool:
        try:
            found = d.find_elements(By.CSS_SELECTOR, css)
            if found:
                found[0].click()
            return bool(found)
        except StaleElementReferenceException:
            return False

    wait.until(clicked)


def test_the_dashboard_lists_groups_with_their_partial_state(
    browser, make_controller, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from lab.groups import create_group, mock_drivers, wait_group_state

    ctl = make_controller(extra_env=mock_drivers(tmp_path))
    with ctl.client() as admin:
        create_group(admin, "shop", count=2)
        wait_group_state(admin, "shop", "Running")
        admin.post("/v1/groups/shop/vms/shop-2/actions", json={"action": "suspend"})
        wait_group_state(admin, "shop", "Partial-Suspended")
    wait = WebDriverWait(browser, 20)
    browser.get(f"{ctl.url}/ui/")
    wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    item = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#groups li[data-group='shop']"))
    assert item[0].get_attribute("data-state") == "Partial-Suspended"
    assert "shop-2 Suspended" in item[0].get_attribute("title")
    item[0].find_element(By.CSS_SELECTOR, "span").click()  # shows the group's network
    wait.until(lambda d: d.find_element(By.ID, "mesh-title").text.startswith("shop:"))
    # An admin resumes the suspended VM from the page.
    assert browser.find_element(By.ID, "who").text == "admin"
    _click(wait, "#groups li[data-group='shop'] button[data-action='resume']")
    wait.until(lambda d: "shop: resume asked" in d.find_element(By.ID, "group-message").text)
    with ctl.client() as admin:
        wait_group_state(admin, "shop", "Running")
    # Each VM's state is on the page, not only on hover; nothing failed in the page.
    wait.until(
        lambda d: (
            {
                (v.get_attribute("data-vm"), v.get_attribute("data-state"))
                for v in d.find_elements(
                    By.CSS_SELECTOR, "#groups li[data-group='shop'] li[data-vm]"
                )
            }
            == {("shop-1", "Running"), ("shop-2", "Running")}
        )
    )
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    shot = REPO / "artifacts" / "dashboard-groups.png"
    shot.parent.mkdir(exist_ok=True)
    browser.find_element(By.ID, "groups").screenshot(str(shot))
    assert shot.stat().st_size > 1_000
    with ctl.client() as admin:
        r = admin.post("/v1/admin-tokens", json={"role": "viewer", "description": "v"})
    browser.find_element(By.ID, "logout").click()
    box = wait.until(ec.visibility_of_element_located((By.ID, "token")))
    box.clear()
    box.send_keys(r.json()["token"])
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(ec.visibility_of_element_located((By.ID, "main")))
    # A viewer sees the groups and their VMs, not an admin's buttons.
    wait.until(lambda d: d.find_element(By.ID, "who").text == "viewer")
    wait.until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#groups li[data-vm='shop-2']")
            and not d.find_elements(By.CSS_SELECTOR, "#groups button")
        )
    )


def test_the_monitoring_proxy_reads_for_readers_only_and_only_queries(
    dashboard: tuple[Controller, Mosquitto, Collector],
) -> None:
    controller, _, collector = dashboard
    url = f"{controller.url}/v1/monitoring/alarms"
    assert httpx.get(url, timeout=10).status_code == 401
    with controller.client() as admin:
        r = admin.post("/v1/admin-tokens", json={"role": "viewer", "description": "ui"})
        viewer = r.json()["token"]
        with collector.client() as c:
            assert admin.get("/v1/monitoring/alarms").json() == c.get("/v1/alarms").json()
        # Queries with their parameters pass; the collector's 4xx comes back as it is.
        r = admin.get("/v1/monitoring/series", params={"host": "vm9", "metric": "load1"})
        assert r.status_code == 200 and r.json()["points"] == []
        assert admin.get("/v1/monitoring/hosts/vm9/latest").json()["error"] == "not_found"
        # Nothing but the listed GET queries: no rule changes, no other path.
        assert admin.post("/v1/monitoring/alarms", json={}).status_code == 405
        for path in ("healthz", "alarms/r-1", "hosts/a/b/latest", "hosts/../latest"):
            assert admin.get(f"/v1/monitoring/{path}").status_code == 404, path
    with controller.client(token=viewer) as v:
        assert v.get("/v1/monitoring/metrics/latest").status_code == 200
    collector.stop()
    with controller.client() as admin:
        r = admin.get("/v1/monitoring/alarms")
        assert r.status_code == 502 and r.json()["error"] == "collector_unreachable"


def test_the_monitoring_proxy_without_a_collector_or_its_token(
    controller: Controller, make_controller, make_collector
) -> None:
    with controller.client() as admin:
        r = admin.get("/v1/monitoring/alarms")
    assert r.status_code == 503 and r.json()["error"] == "no_collector"
    collector = make_collector()
    url = {"CLADNET_COLLECTOR_URL": collector.url}
    for env, status, error in (
        (url, 503, "no_collector_token"),
        ({**url, "CLADNET_COLLECTOR_TOKEN": "wrong"}, 502, "collector_refused"),
    ):
        with make_controller(extra_env=env).client() as admin:
            r = admin.get("/v1/monitoring/alarms")
        # Not a 401: the caller's token is fine, the controller's own is missing/wrong.
        assert (r.status_code, r.json()["error"]) == (status, error)
