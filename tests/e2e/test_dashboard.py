"""The web dashboard in a real browser: headless Chromium (Debian's package) driven by Selenium
loads the dashboard of a running federation and must show the fleet and the curves."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from deploy_tools import ROOT, tool
from fedge_processes import DigitsFiles, Processes, coordinator_config, free_port, start_coordinator

pytestmark = pytest.mark.slow

AGENTS = 3


def test_the_dashboard_shows_the_fleet_and_the_curves(
    tmp_path: Path, procs: Processes, http: httpx.Client, digits: Callable[[int], DigitsFiles]
) -> None:
    chromium = tool("chromium", "chromium")
    driver_path = tool("chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    files = digits(AGENTS)
    port = free_port()
    config = coordinator_config(tmp_path / "coordinator.toml", eval_data=files.test,
                                data_dir=tmp_path / "store", port=port, rounds=30, cohort_size=AGENTS,
                                deadline_s=30.0, min_devices=AGENTS)
    coordinator = start_coordinator(procs, http, config, port)
    for i, path in enumerate(files.devices):
        procs.agent(f"agent-{i}", coordinator.url, path)
    coordinator.wait_for("two rounds", lambda s: s["rounds_complete"] >= 2, timeout_s=120)

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=driver_path)
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(f"{coordinator.url}/dashboard")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")) == AGENTS)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#accuracy circle.point")) >= 2)
        rows = browser.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")
        devices = {row.get_attribute("data-device") for row in rows}
        assert devices == {f"agent-{i}" for i in range(AGENTS)}
        assert "ok" in browser.find_element(By.CSS_SELECTOR, "#fleet tbody").text  # the policy verdicts
        assert browser.find_elements(By.CSS_SELECTOR, "#timeline rect")
        # Live: more rounds appear without reloading the page.
        before = len(browser.find_elements(By.CSS_SELECTOR, "#accuracy circle.point"))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#accuracy circle.point")) > before)
        events = browser.find_element(By.CSS_SELECTOR, "#events tbody").text
        assert "agent-" in events  # the agents' start events
        artifacts = Path(os.environ.get("FEDGE_ARTIFACTS", ROOT / "artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(artifacts / "dashboard.png"))
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe  # no script error, no blocked asset (the page works offline)
        assert not browser.find_element(By.ID, "login").is_displayed()  # --insecure: no admin token asked
    finally:
        browser.quit()
