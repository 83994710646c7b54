"""`leantune ui` in a real headless chromium: the guide filters and expands (mouse and keyboard), the
planner form draws a bar per configuration against the GPU line and shows errors inline, a run's curves
are drawn and follow a live run, two runs compare side by side, and a phone-width page does not scroll
sideways. Each test leaves a screenshot in the artifact folder (path printed)."""

from __future__ import annotations

import json
from pathlib import Path

from playwright.sync_api import expect

from leantune.ui.guide import TECHNIQUES

from .conftest import _metrics

expect.set_options(timeout=30_000)  # the page draws after its fetches answer: a loaded CI machine is slow

CONFIGS = Path(__file__).parent.parent / "plan_configs"


def visible(page, selector: str) -> int:
    return page.locator(f"{selector}:visible").count()


def test_guide_table_filters_by_category_and_a_click_expands_a_technique(page, artifacts):
    assert visible(page, "#compare tbody tr") == len(TECHNIQUES) == visible(page, "#cards .card")
    page.get_by_role("button", name="Quantization", exact=True).click()
    quant = [t for t in TECHNIQUES if t["category"] == "quantization"]
    assert visible(page, "#compare tbody tr") == len(quant) == visible(page, "#cards .card")
    assert {t.strip() for t in page.locator("#compare tbody tr:visible th").all_inner_texts()} == {t["name"] for t in quant}
    page.get_by_role("button", name="All", exact=True).click()
    assert visible(page, "#cards .card") == len(TECHNIQUES)

    card = page.locator("#card-qlora")
    assert card.locator(".body").is_hidden()
    card.locator("h3 button").click()
    body = card.locator(".body")
    assert body.is_visible() and card.locator("h3 button").get_attribute("aria-expanded") == "true"
    text = body.inner_text()
    for part in ("How it works", "Use cases", "Limitations", "leantune train my.yaml --quant.bits 4", "Measured", "Dettmers"):
        assert part in text, part
    page.screenshot(path=str(artifacts / "guide-expanded.png"), full_page=True)


def test_guide_works_from_the_keyboard(page):
    page.locator("#compare tbody tr[data-id=dora] th button").focus()
    page.keyboard.press("Enter")  # the table's name jumps to its card, expanded and focused
    assert page.locator("#card-dora .body").is_visible()
    assert page.evaluate("document.activeElement.closest('.card').id") == "card-dora"
    page.keyboard.press("Space")
    assert page.locator("#card-dora .body").is_hidden()
    page.keyboard.press("Tab")  # focus moves on to the next card's button
    assert page.evaluate("document.activeElement.closest('.card').id") == "card-ia3"


def test_planner_form_draws_every_configuration_against_the_gpu_line(page, artifacts):
    page.get_by_role("link", name="Planner", exact=True).click()
    page.fill("#plan-model", str(CONFIGS / "Llama-3.1-8B.json"))
    page.fill("#plan-gpu", "RTX 4090")
    page.fill("#plan-seq", "2048")
    page.fill("#plan-batch", "4")
    page.select_option("#plan-method", "lora")
    page.click("#plan-submit")
    page.wait_for_selector("#plan-chart", timeout=120_000)
    labels = page.locator("#plan-chart text.fits, #plan-chart text.oom")
    expect(labels).to_have_count(24)  # 12 configurations, checkpointing off and on
    assert page.locator("#plan-chart text.oom").count() >= 1 and page.locator("#plan-chart text.fits").count() >= 1
    assert page.locator("#gpu-line").count() == 1
    assert "Fits:" in page.inner_text("#plan-verdict") and "RTX 4090" in page.inner_text("#plan-out")
    # a bar that fits ends left of the GPU line; an OOM bar ends right of it
    line_x = float(page.get_attribute("#gpu-line", "x1"))
    ends = page.evaluate("""() => [...document.querySelectorAll('#plan-chart text.fits, #plan-chart text.oom')]
        .map(t => [t.classList.contains('fits'), parseFloat(t.getAttribute('x')) - 4])""")
    assert all((x <= line_x + 0.5) if fits else (x > line_x) for fits, x in ends)
    page.screenshot(path=str(artifacts / "planner.png"), full_page=True)


def test_planner_shows_bad_input_inline(page):
    page.get_by_role("link", name="Planner", exact=True).click()
    page.fill("#plan-model", str(CONFIGS / "Llama-3.1-8B.json"))
    page.fill("#plan-gpu", "RTX 4909")
    page.click("#plan-submit")
    page.wait_for_selector("#plan-error:visible", timeout=120_000)
    assert "did you mean 'RTX 4090'" in page.inner_text("#plan-error")
    page.fill("#plan-gpu", "24GB")
    page.fill("#plan-seq", "0")
    page.evaluate("document.querySelector('#plan-seq').removeAttribute('min')")  # past the browser's own check
    page.click("#plan-submit")
    page.wait_for_function("document.querySelector('#plan-error').textContent.includes('--seq must be > 0')", timeout=120_000)


def test_runs_show_curves_memory_and_data_and_follow_a_live_run(page, runs_root, artifacts):
    page.get_by_role("link", name="Runs", exact=True).click()
    page.wait_for_selector("#runs-table tbody tr")
    rows = page.locator("#runs-table tbody tr")
    assert rows.count() == 2
    assert "running" in page.inner_text("#runs-table tbody tr[data-id=qlora-live]")
    assert "completed" in page.inner_text("#runs-table tbody tr[data-id=lora-done]")

    page.click("#runs-table tbody tr[data-id=lora-done] th button")
    panel = page.locator(".panel.run[data-run=lora-done]")
    panel.wait_for()
    expect(panel.locator("svg.loss-chart path.series")).to_have_count(2)  # train and eval (drawn once metrics arrive)
    assert "40 points" in panel.locator("svg.loss-chart").get_attribute("aria-label")
    expect(panel.locator("svg.memory rect")).to_have_count(6)
    expect(panel).to_contain_text("predicted peak 880 MiB, measured 900 MiB")
    expect(panel).to_contain_text("step-000040")
    panel.locator("details summary").click()
    assert "records kept" in panel.inner_text()
    page.screenshot(path=str(artifacts / "run.png"), full_page=True)

    page.click("#runs-table tbody tr[data-id=qlora-live] th button")
    live = page.locator(".panel.run[data-run=qlora-live] svg.loss-chart")
    live.wait_for()
    assert "10 points" in live.get_attribute("aria-label")
    _metrics(runs_root / "qlora-live" / "metrics.jsonl", range(11, 16), 3.4)  # the run logs 5 more steps
    page.wait_for_function("document.querySelector('.panel.run[data-run=qlora-live] svg.loss-chart')"
                           ".getAttribute('aria-label').includes('15 points')", timeout=10_000)


def test_two_runs_side_by_side(page, artifacts):
    page.get_by_role("link", name="Runs", exact=True).click()
    page.wait_for_selector("#runs-table tbody tr")
    page.select_option("#cmp-a", "lora-done")
    page.select_option("#cmp-b", "qlora-live")
    page.click("#cmp-go")
    page.wait_for_selector("[data-chart=compare-chart]")
    expect(page.locator("[data-chart=compare-chart] path.series")).to_have_count(2)
    expect(page.locator(".panel.run")).to_have_count(2)
    boxes = [page.locator(f".panel.run[data-run={r}]").bounding_box() for r in ("lora-done", "qlora-live")]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] < boxes[1]["x"]  # side by side on a wide screen
    page.screenshot(path=str(artifacts / "compare.png"), full_page=True)


def test_phone_width_has_no_sideways_scroll(browser, server, artifacts):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page = ctx.new_page()
    try:
        for tab in ("guide", "planner", "runs", "chat"):
            page.goto(f"{server}/#{tab}")
            page.wait_for_selector("body[data-ready=guide]")
            if tab == "guide":
                page.locator("#card-lora h3 button").click()
            if tab == "planner":
                page.fill("#plan-model", str(CONFIGS / "Qwen2.5-7B.json"))
                page.click("#plan-submit")
                page.wait_for_selector("#plan-chart", timeout=120_000)
            if tab == "runs":
                page.wait_for_selector(".panel.run svg.loss-chart")
            if tab == "chat":
                page.wait_for_selector("body[data-chat=none]")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{tab}: the page is {width} px wide at a 390 px viewport"
            page.screenshot(path=str(artifacts / f"phone-{tab}.png"), full_page=True)
    finally:
        ctx.close()
    assert json.dumps([p.name for p in sorted(artifacts.glob("phone-*.png"))]) == \
        '["phone-chat.png", "phone-guide.png", "phone-planner.png", "phone-runs.png"]'
