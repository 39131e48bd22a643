"""Views in a real browser: the offline report and notebook widgets mount in headless Chromium with
every host unresolvable, and the page requests nothing remote (Chromium's net log says so)."""

import json
import re
import shutil
import subprocess
import tempfile

import pytest
import torch
from tiny import THINK_TRACE

import stepsal
from stepsal.studies.report import report_from_folder
from stepsal.vis.render import Widget
from stepsal.vis.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(page) -> tuple[str, list[str]]:
    """(DOM after scripts ran, URLs the page itself requested) from headless Chromium, offline."""
    assert CHROMIUM, "Chromium is missing: `make venv` installs it (apt-get install -y chromium)"
    with tempfile.TemporaryDirectory() as profile:
        net_log = f"{profile}/net.json"
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={net_log}",
             "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)
        with open(net_log) as handle:
            log = json.load(handle)
    types = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    starts = [event.get("params", {}) for event in log["events"] if types[event["type"]] == "URL_REQUEST_START_JOB"]
    requested = [params["url"] for params in starts if "url" in params
                 and params.get("initiator") != "not an origin"  # Chromium's own background calls
                 and not params["url"].startswith(("file:", "data:"))]
    return result.stdout, requested


def mounted_widgets(dom: str) -> dict[str, bool]:
    """Each widget's mount point: did React render children into it?"""
    return {match.group(1): not dom[match.end():].lstrip().startswith("</div>")
            for match in re.finditer(r'<div id="(stepsal-[0-9a-f]+)" class="stepsal-widget"[^>]*>', dom)}


@pytest.fixture(scope="module")
def result(tl_models, tokenizer):
    trace = stepsal.Trace.from_text(THINK_TRACE, tokenizer)
    return stepsal.step_saliency(tl_models[("llama", "bridge")], trace, token_level=True, per_head=True)


def test_the_render_check_detects_remote_requests_and_unmounted_widgets(tmp_path):
    """The control: a page that loads from a CDN is caught, and a widget without the bundle stays empty."""
    page = tmp_path / "bad.html"
    widget = Widget("ColoredTokens", {"tokens": ["a", "b"], "values": [0.1, 0.9]})
    page.write_text(f"<html><body><img src='https://unpkg.com/x.png'>{widget.html(bundle=False)}</body></html>")
    dom, requested = render(page)
    assert requested == ["https://unpkg.com/x.png"]
    assert mounted_widgets(dom) == {widget.element_id: False}


def test_report_opens_offline_with_live_widgets(result, tmp_path):
    path = write_report(tmp_path, [result], ["tiny llama"])
    source = path.read_text()
    assert source.count("var CircuitsVis=") == 1  # one copy of the bundle
    dom, requested = render(path)
    assert requested == []
    mounted = mounted_widgets(dom)
    assert len(mounted) == 3 and all(mounted.values())  # step maps, received tokens, segmentation
    assert "Per-layer measures" in dom and "local_share" in dom and "data:image/png;base64" in dom


def test_study_report_from_a_folder_of_saved_results(result, tmp_path):
    for group in ("correct", "wrong"):
        (tmp_path / group).mkdir()
        for i in range(2):
            shifted = result.__class__(result.sums * (1 + i + (group == "wrong")), result.layout, result.layers,
                                       token_texts=result.token_texts)
            shifted.save(tmp_path / group / f"trace{i}.safetensors")
    path = report_from_folder(tmp_path)
    dom, requested = render(path)
    assert requested == []
    mounted = mounted_widgets(dom)
    assert len(mounted) == 4 * 3 and all(mounted.values())  # maps, received tokens, segmentation per result
    assert "correct vs wrong" in dom and "hedges_g" in dom
    for name in ("correct/trace0.safetensors", "wrong/trace1.safetensors"):
        assert name in dom
    assert dom.index("correct vs wrong") < dom.index("<h2>Results</h2>")  # the comparison opens the page
    short = report_from_folder(tmp_path, tmp_path / "short", max_sections=1).read_text()
    assert short.count("<section id=") == 1 and "first 1 of 4 results" in short
    assert len(short) < path.stat().st_size  # widgets and figures of three results left out
    for name in ("correct/trace1.safetensors", "wrong/trace0.safetensors"):
        assert name in short  # still listed


def test_notebook_widgets_mount_offline_and_share_one_bundle(result, tokenizer, tmp_path, monkeypatch):
    import circuitsvis.utils.render

    def no_probe():
        raise AssertionError("circuitsvis's internet probe ran")

    monkeypatch.setattr(circuitsvis.utils.render, "internet_on", no_probe)
    widgets = [result.show("maps"), result.show("heads", layer=1), result.show("tokens", source=2),
               stepsal.Trace.from_text(THINK_TRACE, tokenizer).show()]
    cells = [w._repr_html_() for w in widgets]  # what Jupyter puts on the page, output after output
    assert all("unpkg" not in cell and "cdn" not in cell.split("CircuitsVis.render")[-1] for cell in cells)
    page = tmp_path / "notebook.html"
    page.write_text("<html><body>" + "\n".join(cells) + "</body></html>")
    dom, requested = render(page)
    assert requested == []
    mounted = mounted_widgets(dom)
    assert len(mounted) == 4 and all(mounted.values())


def test_result_reprs_are_short_and_their_html_is_static(result, tl_models, tokenizer):
    trace = stepsal.Trace.from_text(THINK_TRACE, tokenizer)
    effect = stepsal.saliency_change(tl_models[("llama", "bridge")], trace, stepsal.StepFlow(tau_max=0.9))
    generation = stepsal.generate(tl_models[("llama", "bridge")], trace.tokens[:40], stepsal.StepFlow(tau_max=0.9),
                                  max_new_tokens=3)
    comparison = stepsal.compare_groups([result] * 3, [result] * 2, n_boot=20)
    objects = [trace, result, result.metrics(), comparison, generation, effect, effect.stats]
    for obj in objects:
        text = repr(obj)
        assert len(text) < 200 and "tensor(" not in text, text
        html = obj._repr_html_()
        assert "<script" not in html and "http" not in html.replace("http://www.w3.org", "")
    assert repr(result).startswith("StepSaliency(LlamaForCausalLM: 2 layers x 7 steps (124 tokens)")


def test_dataframes_match_the_tensors(result):
    frame = result.to_dataframe()
    n = result.layout.n_steps
    assert len(frame) == len(result.layers) * n * n
    row = frame[(frame.layer == 1) & (frame.step_q == 5) & (frame.step_k == 2)].iloc[0]
    assert row.value == pytest.approx(float(result.maps[1, 5, 2]))
    assert (row.kind_q, row.kind_k) == ("summary", "thinking")
    metrics = result.metrics()
    long = metrics.to_dataframe()
    assert float(long[(long.layer == 0) & (long.measure == "recency")].value.iloc[0]) == pytest.approx(
        float(metrics.recency[0]), nan_ok=True)


def test_token_level_sums_pool_to_the_step_sums(result):
    """What tokens receive from each query step, summed over each key step, is the step map's block sum."""
    token_sums = result.token_sums  # [layer, step_q, token]
    pooled = token_sums @ result.members.float().T  # [layer, step_q, step_k]
    torch.testing.assert_close(pooled, result.sums, rtol=1e-4, atol=1e-7)


def test_trace_text_cannot_break_the_page(result, tmp_path):
    """Text from a trace goes into widget props and tables: '<!--<script>' must stay text."""
    import dataclasses

    steps = [dataclasses.replace(s, text=s.text + " <!--<script></script> <b>bold</b>") for s in result.layout.steps]
    evil = dataclasses.replace(result, layout=dataclasses.replace(result.layout, steps=steps),
                               token_texts=[t + "<!--" for t in result.token_texts], model="<i>m</i>")
    path = write_report(tmp_path, [evil, result], ["evil <b>", "clean"])
    dom, requested = render(path)
    mounted = mounted_widgets(dom)
    assert requested == [] and len(mounted) == 6 and all(mounted.values())
    assert "<b>bold</b>" not in dom and "<i>m</i>" not in dom


def test_other_safetensors_files_are_skipped_and_named(result, tmp_path):
    from safetensors.torch import save_file

    result.save(tmp_path / "a.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    page = report_from_folder(tmp_path).read_text()
    assert "Skipped 1 .safetensors file(s) that are not stepsal results: model.safetensors" in page


def test_views_name_layers_and_steps_and_stay_legible(result, tmp_path):
    """Issue 19: circuitsvis's labels say what the tiles are; the page shows one normalisation; the maps'
    colour scale spans their values; the question and the first summary step differ in colour."""
    from stepsal.vis.render import RELABEL, bundle_js
    from stepsal.vis.widgets import segmentation_from_tokens, step_maps_widget

    source = bundle_js()
    for old, new in RELABEL.items():
        assert old not in source and source.count(new) == 1  # a circuitsvis upgrade that moves a label fails here
    dom, _ = render(write_report(tmp_path, [result], ["tiny llama"]))
    assert "Maps: a layer each, or a head each" in dom and "Head Selector" not in dom
    assert "Maps shown row-normalised" in dom and "causal maps, result.maps, differ" in dom
    assert "row norm" in result.plot()._suptitle.get_text() and "causal" not in result.plot()._suptitle.get_text()
    widget = step_maps_widget(torch.tensor([[[0.2, 0.0], [0.05, 0.1]]]), ["Q", "T1"], ["layer 0"])
    assert widget.props["maxValue"] == pytest.approx(0.2) and widget.props["minValue"] == 0.0
    signed = step_maps_widget(torch.tensor([[[0.2, 0.0], [-0.3, 0.1]]]), ["Q", "T1"], ["layer 0"])
    assert (signed.props["minValue"], signed.props["maxValue"]) == pytest.approx((-0.3, 0.3))
    layout = result.layout
    shades = segmentation_from_tokens([""] * layout.n_tokens, layout).props["values"][:, 0]
    first = {kind: shades[layout.token_step == layout.steps_of(kind)[0]][0].item()
             for kind in (stepsal.QUESTION, stepsal.SUMMARY)}
    assert first[stepsal.QUESTION] != first[stepsal.SUMMARY] and first[stepsal.QUESTION] < 0
