"""tasks.report draws real PNGs from plain data and one page that embeds them (no Ray, no MLflow, no browser:
tests/integration/test_tune_report.py renders a real run's report in headless Chromium)."""

from __future__ import annotations

import base64
import re

from matplotlib.image import imread

from raydistill.tasks import report as fig


def _png_size(path):
    h, w = imread(path).shape[:2]
    return w, h


def test_every_figure_is_a_real_png_even_with_missing_metrics(tmp_path):
    runs = [fig.Curves("trial a", {"loss": [(1, 9.0), (2, 8.0)], "heldout_loss": [(2, 8.5)]}),
            fig.Curves("trial b", {"loss": [(1, 9.5)], "heldout_loss": [(1, 9.4)]}, stopped=True),
            fig.Curves("final", {"loss": [(s, 9 - s / 3) for s in range(1, 7)], "heldout_loss": [(3, 8), (6, 7)]},
                       final=True)]
    rows = {"teacher": {"heldout_loss": 5.0, "perplexity": 148.0, "size_bytes": 2**21},
            "student fp32": {"heldout_loss": 7.0, "perplexity": 1096.0, "top1_agreement": 0.2, "ece": 0.05,
                             "kl_to_teacher": 1.2, "size_bytes": 2**20, "tokens_per_s": 900.0},
            "student int8": {"heldout_loss": 7.1, "top1_agreement": None, "size_bytes": 2**18}}
    trials = [{"params": {"lr": 1e-3, "loss": "forward_kl"}, "heldout_loss": 7.0, "best": True},
              {"params": {"lr": 3e-4, "loss": "reverse_kl"}, "heldout_loss": 8.0, "stopped": True},
              {"params": {"lr": 5e-4, "loss": "forward_kl"}, "heldout_loss": None, "error": "boom"}]
    cache = {"format": "sampled", "vocab_size": 49152, "bytes_per_token": 35.1, "teacher_forwards": 12,
             "shards_total": 12, "shards_computed": 12, "tokens": 4096}
    paths = [fig.curves_figure(runs, tmp_path / "curves.png"), fig.models_figure(rows, tmp_path / "models.png"),
             fig.trials_figure(trials, ["loss", "lr"], tmp_path / "trials.png"),
             fig.cache_figure(cache, tmp_path / "cache.png")]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = _png_size(p)
        assert w >= 300 and h >= 200, (p.name, w, h)


def test_the_page_embeds_every_figure_and_needs_no_network_or_javascript(tmp_path):
    png = fig.cache_figure({"bytes_per_token": 10.0}, tmp_path / "cache.png")
    page = fig.render_html("run <1>", [fig.Section("Cache & co", [png], [{"k": "<b>", "v": 0.123456}], "note"),
                                       fig.Section("Empty")], subtitle="sub")
    srcs = re.findall(r"src='([^']*)'", page)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == png.read_bytes()
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "run &lt;1&gt;" in page and "&lt;b&gt;" in page and "0.123" in page  # escaped, numbers shortened


def test_the_models_figure_adds_the_generation_panels_only_when_measured(tmp_path):
    plain = {"student fp32": {"heldout_loss": 7.0, "top1_agreement": 0.2}}
    scored = {"teacher": {"heldout_loss": 5.0, "gen_teacher_nll": 1.2, "gen_length": 30.0},
              "student fp32": {"heldout_loss": 7.0, "gen_teacher_nll": 3.4, "gen_length": 12.0}}
    w, h = _png_size(fig.models_figure(plain, tmp_path / "plain.png"))
    w2, h2 = _png_size(fig.models_figure(scored, tmp_path / "scored.png"))
    assert w2 == w and h2 > 1.4 * h  # 8 panels on 2 rows, 10 on 3
