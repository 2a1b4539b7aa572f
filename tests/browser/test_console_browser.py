"""The local console in a real browser (headless Chromium via Selenium) against a local stack.

Run alone with `pytest -m browser`. Chromium and chromedriver are Debian's (`make test`
installs them where missing); Selenium is always given the driver, so it never downloads one.
The screenshots in docs/console-*.png are taken here.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from formcall_dev.stack import Stack
from tests.support.reads import form_events, form_row

pytestmark = pytest.mark.browser
DOCS = Path(__file__).resolve().parents[2] / "docs"
# Generous: a loaded machine may be slow; the measured times are printed.
TIMEOUT = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    started = time.monotonic()
    stack = Stack(tmp_path_factory.mktemp("stack"))
    info = stack.start()
    print(f"\nlocal stack start-up: {time.monotonic() - started:.2f} s")
    # The hourly schedule, paused: a tick at the top of the hour must not sweep mid-test.
    httpx.get(info.setup_url, params={"secret": info.credentials["CRON_SECRET"]}, timeout=30)
    httpx.patch(
        f"{info.qstash_url}/v2/schedules/formcall-check-forms/pause",
        headers={"Authorization": f"Bearer {info.credentials['QSTASH_TOKEN']}"},
    )
    yield info
    stack.stop()


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, (
        "the browser tests need Debian's chromium and chromium-driver: `make test` installs "
        "them, or `apt-get install -y chromium chromium-driver`"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    started = time.monotonic()
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    print(f"\nChromium start-up: {time.monotonic() - started:.2f} s")
    yield driver
    driver.quit()


@pytest.fixture
def conn(stack):
    with psycopg.connect(stack.dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture(autouse=True)
def no_console_errors(browser):
    """Every page a test visited logged no error in the browser's console."""
    browser.get_log("browser")  # start clean
    yield
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def wait(driver, condition, timeout: float = TIMEOUT):
    """Wait for a condition on the page; a live region swapped mid-look is looked at again."""
    return WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    ).until(condition)


def read(driver, look):
    """What `look` reads off the page; a live region swapped mid-read is read again."""
    return wait(driver, lambda d: (look(d),))[0]


def timeline(driver) -> list[tuple[str, str]]:
    return [
        (row.get_attribute("data-source"), row.get_attribute("data-what"))
        for row in driver.find_elements(By.CSS_SELECTOR, "#timeline tr[data-source]")
    ]


def screenshot(driver, name: str) -> None:
    """The whole page into docs/ (the window grown to the page's height for the shot)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    # The window's height includes a little browser chrome even headless: leave room for it.
    driver.set_window_size(1440, max(900, min(height + 200, 2600)))
    driver.save_screenshot(str(DOCS / name))
    driver.set_window_size(1440, 1000)


def click(driver, css: str) -> None:
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True)


def test_forms_page_lists_a_new_form_quickly(stack, browser, conn):
    browser.get(f"{stack.console_url}/forms")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Forms"
    patient = create_patient(
        conn, full_name="Rosalind Franklin", phone="+15550100501", timezone="Europe/London"
    )
    form = create_form(
        conn,
        patient_id=patient,
        title="Allergy questionnaire",
        deadline=datetime.now(UTC) + timedelta(hours=2),
    )
    committed = time.monotonic()
    row = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-form-id="{form}"]'))
    print(f"\nforms page listed the new form {time.monotonic() - committed:.2f} s after commit")
    assert "Rosalind Franklin" in row[0].text and "Europe/London" in row[0].text
    # The filter narrows the live list: a pending form is not among the called ones.
    browser.get(f"{stack.console_url}/forms?status=called")
    wait(browser, lambda d: d.find_element(By.ID, "forms-table"))
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-form-id="{form}"]')


def test_a_forms_journey_shows_a_deadline_call_end_to_end(stack, browser, conn):
    browser.get(f"{stack.console_url}/act")
    create = browser.find_element(By.ID, "create-form")
    for name, value in (
        ("full_name", "Ada Lovelace"),
        ("phone", "+15550100502"),
        ("timezone", "America/New_York"),
        ("title", "Pre-visit questionnaire"),
        ("due_in_seconds", "3"),
    ):
        field = create.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    clicked = time.monotonic()
    create.find_element(By.ID, "create").click()
    wait(browser, lambda d: "/forms/" in d.current_url)
    form = browser.current_url.split("/forms/")[1].split("?")[0]
    # The deadline call, placed by the one-time QStash message; the fake Vapi's call ends and
    # its end-of-call report reaches call-events.
    wait(browser, lambda d: ("formcall", "call ended") in timeline(d))
    print(
        f"\njourney showed the call placed, ended and recorded "
        f"{time.monotonic() - clicked:.2f} s after Create (deadline 3 s, call 2 s)"
    )
    entries = read(browser, timeline)
    audit = [what for source, what in entries if source == "formcall"]
    assert audit == ["scheduled", "delivered", "claimed", "called", "call ended"]
    assert [event.replace("_", " ") for event in form_events(conn, form)] == audit
    states = [what.split(" · ")[0] for source, what in entries if source == "QStash"]
    assert states[0] == "published" and "delivered" in states
    assert ("Vapi", "call created") in entries and ("Vapi", "call ended") in entries
    assert read(browser, lambda d: d.find_element(By.ID, "call-status").text) == "called"
    assert read(browser, lambda d: d.find_element(By.ID, "call-outcome").text) == "reached"
    screenshot(browser, "console-journey.png")


def test_dlq_retry_redelivers(stack, browser, conn):
    key = stack.credentials["VAPI_PRIVATE_KEY"]
    httpx.post(
        f"{stack.vapi_url}/_fake/rules",
        headers={"Authorization": f"Bearer {key}"},
        json={"customer_number": "+15550100503", "status": 400, "times": 1},
        timeout=30,
    ).raise_for_status()
    patient = create_patient(conn, full_name="Alan Turing", phone="+15550100503")
    form = create_form(
        conn,
        patient_id=patient,
        title="Medication list",
        deadline=datetime.now(UTC) - timedelta(seconds=1),
    )
    wait_until(lambda: form_row(conn, form)["call_status"] == "failed", timeout=TIMEOUT)
    browser.get(f"{stack.console_url}/qstash")
    rows = wait(
        browser,
        lambda d: [row.text for row in d.find_elements(By.CSS_SELECTOR, "tr[data-dlq-id]")],
    )
    assert len(rows) == 1 and "489" in rows[0]
    assert "formcall-check-forms" in read(
        browser, lambda d: d.find_element(By.ID, "schedules").text
    )
    screenshot(browser, "console-qstash.png")
    delivered = form_events(conn, form).count("delivered")
    click(browser, "tr[data-dlq-id] button.retry")
    wait(browser, lambda d: "published again" in d.find_element(By.ID, "notice").text)
    wait_until(lambda: form_events(conn, form).count("delivered") == delivered + 1, timeout=TIMEOUT)
    # Re-delivered to call-form, which answers for a form already marked failed.
    assert form_events(conn, form)[-1] == "skipped"
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "tr[data-dlq-id]"))
    browser.get(f"{stack.console_url}/forms/{form}")
    wait(browser, lambda d: ("formcall", "skipped") in timeline(d))


def test_dont_answer_leads_to_a_scheduled_follow_up(stack, browser, conn):
    browser.get(f"{stack.console_url}/act")
    click(browser, "#hold-toggle")
    wait(browser, lambda d: "ring until" in d.find_element(By.ID, "holding").text)
    try:
        patient = create_patient(conn, full_name="Marie Curie", phone="+15550100505")
        form = create_form(
            conn,
            patient_id=patient,
            title="Family history",
            deadline=datetime.now(UTC) - timedelta(seconds=1),
        )
        browser.get(f"{stack.console_url}/forms/{form}")
        call = wait(
            browser,
            lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-call-id][data-status="ringing"]'),
        )[0]
        call_id = call.get_attribute("data-call-id")
        clicked = time.monotonic()
        click(browser, f'tr[data-call-id="{call_id}"] button.play-no_answer')
        wait(browser, lambda d: "ended: no answer" in d.find_element(By.ID, "notice").text)
        # The fake Vapi reports the end to call-events; formcall schedules the next call.
        wait(browser, lambda d: ("formcall", "follow up scheduled") in timeline(d))
        print(
            f"\njourney showed the follow-up {time.monotonic() - clicked:.2f} s after don't answer"
        )
        [scheduled] = conn.execute(
            "select detail->>'next_call_at' from form_call_events"
            " where form_id = %s and event = 'follow_up_scheduled'",
            (form,),
        ).fetchone()
        next_call = datetime.fromisoformat(scheduled).astimezone(UTC)
        # The page's live regions are swapped as it refreshes: each read is a wait, so an
        # element replaced mid-read is looked up again (and a wrong text still fails).
        wait(
            browser,
            lambda d: any(
                "no_answer (customer-did-not-answer)" in row.text
                for row in d.find_elements(By.CSS_SELECTOR, '#timeline tr[data-what="call ended"]')
            ),
        )
        wait(
            browser,
            lambda d: (
                f"next_call_at {scheduled}"
                in d.find_element(
                    By.CSS_SELECTOR, '#timeline tr[data-what="follow up scheduled"]'
                ).text
            ),
        )
        wait(
            browser,
            lambda d: (
                "customer-did-not-answer"
                in d.find_element(By.CSS_SELECTOR, f'tr[data-call-id="{call_id}"]').text
            ),
        )
        if next_call - datetime.now(UTC) < timedelta(seconds=TIMEOUT):
            # The dev stack's follow-up delay is seconds: the follow-up call rings; answer it.
            again = wait(
                browser,
                lambda d: [
                    row
                    for row in d.find_elements(
                        By.CSS_SELECTOR, 'tr[data-call-id][data-status="ringing"]'
                    )
                    if row.get_attribute("data-call-id") != call_id
                ],
            )
            second = again[0].get_attribute("data-call-id")
            click(browser, f'tr[data-call-id="{second}"] button.play-reached')
            wait(
                browser,
                lambda d: (
                    d.find_elements(By.ID, "call-outcome")
                    and d.find_element(By.ID, "call-outcome").text == "reached"
                ),
            )
        else:
            # A follow-up a day away: the form waits for it, pending, its next call shown.
            wait(browser, lambda d: d.find_element(By.ID, "call-status").text == "pending")
            wait(
                browser,
                lambda d: (
                    d.find_element(By.ID, "next-call").text
                    == next_call.strftime("%Y-%m-%d %H:%M:%S UTC")
                ),
            )
    finally:
        browser.get(f"{stack.console_url}/act")
        click(browser, "#hold-toggle")
        wait(browser, lambda d: "by themselves" in d.find_element(By.ID, "holding").text)


def test_every_page_renders_without_a_console_error(stack, browser, conn):
    patient = create_patient(
        conn, full_name="Katherine Johnson", phone="+15550100504", timezone="America/Chicago"
    )
    create_form(
        conn,
        patient_id=patient,
        title="Insurance details",
        deadline=datetime.now(UTC) - timedelta(seconds=1),
    )
    submitted = create_form(
        conn,
        patient_id=patient,
        title="Travel history",
        deadline=datetime.now(UTC) + timedelta(minutes=5),
    )
    conn.execute("update forms set submitted_at = now() where id = %s", (submitted,))
    for path, heading in (
        ("/forms", "Forms"),
        ("/qstash", "QStash"),
        ("/act", "Act"),
        (f"/forms/{submitted}", "Travel history"),
    ):
        browser.get(stack.console_url + path)
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith(heading)
        # Let the live parts refresh a few times: their fetches must not fail either.
        region = browser.find_element(By.CSS_SELECTOR, "[data-refresh]")
        wait(browser, lambda d, region=region: region.get_attribute("data-updated"))
        first = region.get_attribute("data-updated")
        wait(
            browser,
            lambda d, region=region, first=first: region.get_attribute("data-updated") != first,
        )
        assert "stale" not in region.get_attribute("class")
    browser.get(f"{stack.console_url}/forms")
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-form-id="{submitted}"]'))
    screenshot(browser, "console-forms.png")
