"""An HTML template that makes `dvc plots show` and `dvc plots diff` pages render offline.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so with no network it stays
blank. This template inlines the three libraries (vl-convert's bundle sets the globals `vega`,
`vegaLite` and `vegaEmbed` that DVC's per-plot scripts call) in a classic <script> placed before
`{plot_divs}`, and leaves out `{scripts}` (DVC's CDN tags). `.dvc/config` points
`plots.html_template` at the committed file.

    python -m twophase.offline_plots [PATH]     # regenerate it (needs vl-convert-python)
"""

from __future__ import annotations

import sys
from pathlib import Path

TEMPLATE = Path("plots/offline_template.html")
VEGA_LITE_VERSION = "5.21"  # DVC's plot specs use the Vega-Lite v5 schema

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>DVC plots</title>
<style>
  body {{ font-family: sans-serif; }}
  table {{ border-spacing: 15px; }}
</style>
<!-- Vega, Vega-Lite {vega_lite} and Vega-Embed, inlined by twophase.offline_plots -->
<script type="text/javascript">
{bundle}
</script>
{{refresh_tag}}
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def template_html(vega_lite_version: str = VEGA_LITE_VERSION) -> str:
    import vl_convert  # only to regenerate the template, not to use it

    bundle: str = vl_convert.javascript_bundle(vl_version=vega_lite_version)  # type: ignore[call-arg]
    # "</script>" inside the bundle would end the script element early.
    bundle = bundle.replace("</script>", "<\\/script>")
    return PAGE.format(bundle=bundle, vega_lite=vega_lite_version)


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else TEMPLATE
    path.write_text(template_html(), encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
