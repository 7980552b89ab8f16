"""HTML to text: the visible text of an HTML document, for corpus documents of ``kind == "html"``.

The stdlib ``html.parser`` keeps the visible text, drops scripts, styles and page boilerplate
(nav, header, footer, ...), turns block elements into line breaks. Malformed markup never raises.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Content that is never visible text (script, style...) or is page chrome repeated on every page
# of a site (nav, header, footer...): it would only add near-duplicate noise to the corpus.
_DROPPED_ELEMENTS = frozenset(
    {
        "script", "style", "noscript", "template", "svg", "head", "title",
        "nav", "header", "footer", "aside", "form",
    }
)
# Elements after which text continues on a new paragraph (a blank line) or a new line.
_PARAGRAPH_ELEMENTS = frozenset(
    {
        "p", "div", "section", "article", "main", "blockquote", "pre", "table", "ul", "ol", "dl",
        "h1", "h2", "h3", "h4", "h5", "h6", "figure", "figcaption", "details", "summary", "hr",
        "address", "fieldset",
    }
)
_LINE_ELEMENTS = frozenset({"br", "li", "tr", "dt", "dd", "caption", "option"})
# Table cells sit side by side: a space keeps "a</td><td>b" from becoming "ab".
_CELL_ELEMENTS = frozenset({"td", "th"})
_HTML_SPACE = re.compile(r"\s+")


class _TextExtractor(HTMLParser):
    """Collects visible text; block boundaries become pending line breaks, emitted lazily so
    that nested or empty blocks never pile up blank lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive already unescaped
        self.parts: list[str] = []
        self.dropped: list[str] = []  # open elements whose content is dropped, innermost last
        self.pre_depth = 0
        self.pending_breaks = 0  # 0: none, 1: new line, 2: new paragraph
        self.space_pending = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROPPED_ELEMENTS:
            self.dropped.append(tag)
        elif tag == "body":
            self.dropped.clear()  # "</head>" is optional in HTML: the body starts visible text
        elif not self.dropped:
            self._boundary(tag)
            if tag == "pre":
                self.pre_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.dropped:
            # Close the element and anything left unclosed inside it ("<form><svg></form>").
            while self.dropped.pop() != tag:
                pass
        elif tag in ("body", "html"):
            self.dropped.clear()  # an unclosed <nav> must not swallow text past the page's end
        elif not self.dropped:
            self._boundary(tag)
            if tag == "pre" and self.pre_depth:
                self.pre_depth -= 1

    def handle_data(self, data: str) -> None:
        if self.dropped:
            return
        if self.pre_depth:
            self._emit(data.replace("\r\n", "\n"))
            return
        # Outside <pre>, any run of whitespace (source newlines included) renders as one space.
        collapsed = _HTML_SPACE.sub(" ", data)
        if collapsed.startswith(" "):
            self.space_pending = True
        if collapsed.strip():
            self._emit(collapsed.strip())
            self.space_pending = collapsed.endswith(" ")

    def parse_marked_section(self, i: int, report: int = 1) -> int:
        # The stdlib asserts on marked sections it does not know (IE's "<![if !IE]>", "<![ x"):
        # skip them up to the next ">", as browsers do.
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            end = self.rawdata.find(">", i)
            return -1 if end < 0 else end + 1

    def _boundary(self, tag: str) -> None:
        if tag in _PARAGRAPH_ELEMENTS:
            self.pending_breaks = 2
        elif tag in _LINE_ELEMENTS:
            self.pending_breaks = max(self.pending_breaks, 1)
        elif tag in _CELL_ELEMENTS:
            self.space_pending = True

    def _emit(self, text: str) -> None:
        if self.parts:
            if self.pending_breaks:
                self.parts.append("\n" * self.pending_breaks)
            elif self.space_pending:
                self.parts.append(" ")
        self.pending_breaks = 0
        self.space_pending = False
        self.parts.append(text)


def html_to_text(html: str) -> str:
    """The visible text of an HTML document, one block per line, paragraphs apart by one blank line.

    Never raises: malformed markup (unclosed or stray tags, garbage) yields whatever text can be
    recovered.
    """
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # noqa: BLE001 - a parser bug must not fail a shard; keep what was read
        pass
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    kept: list[str] = []
    for line in lines:
        if line or (kept and kept[-1]):  # at most one blank line in a row
            kept.append(line)
    return "\n".join(kept).strip("\n")
