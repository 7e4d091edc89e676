"""The report builder writes matching Markdown and HTML with relative image links."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anatomical_embedding.evaluation.report import Report  # noqa: E402


def test_markdown_and_html(tmp_path):
    fig_path = tmp_path / "figs" / "a.png"
    fig_path.parent.mkdir()
    plt.figure()
    plt.plot([0, 1])
    plt.savefig(fig_path)
    plt.close()
    r = Report("Demo <report>")
    r.heading("Landmarks")
    r.paragraph("Errors in mm.")
    r.table(["method", "mean"], [["aefm", 3.14159], ["identity", 21.0], ["nan", float("nan")]])
    r.image(fig_path, "CDF")
    md, html = r.write(tmp_path / "out")
    text = md.read_text(encoding="utf-8")
    assert "| aefm | 3.1 |" in text and "| nan | – |" in text
    assert "![CDF](../figs/a.png)" in text
    page = html.read_text(encoding="utf-8")
    assert "Demo &lt;report&gt;" in page and '<img src="../figs/a.png"' in page and "<td>21.0</td>" in page
