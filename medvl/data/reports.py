"""Radiology report text: MIMIC-CXR free-text reports and IU X-ray (Open-i) XML, to findings and impression.

MIMIC-CXR reports (``files/pXX/pSUBJECT/sSTUDY.txt``) are plain text with all-caps section headers
(``FINDINGS:``, ``IMPRESSION:``...), lines that start with one space, PHI replaced by ``___``, and addenda placed
above the original report (``FINAL ADDENDUM`` ... ``FINAL REPORT``). :func:`parse_mimic_report`:

* finds headers as an all-caps name followed by a colon at the start of a line (text may follow on the same
  line), and maps known spellings (``IMPRESSIONS``, ``CONCLUSION``, ``FINDINGS AND IMPRESSION``, common typos) to
  ``findings`` / ``impression``;
* takes findings and impression from the original report; addendum text is kept apart in ``addendum`` (it
  usually records a phone call or a correction) and is used for findings/impression only when the original report
  has neither;
* keeps ``___`` as one token (runs of underscores become ``___``, separated from adjoining letters);
* ``last_paragraph``: the last paragraph that is not under a bookkeeping header (indication, history, comparison,
  technique, examination, notification...). :func:`report_text` falls back to it only for reports that have
  neither a FINDINGS nor an IMPRESSION section (plain-paragraph reports); a report with an IMPRESSION and no
  FINDINGS has no findings text.

Section texts are single-line: whitespace, including line breaks, is collapsed to single spaces.
"""

from __future__ import annotations

import enum
import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import InvalidReportError


class ReportSection(str, enum.Enum):
    """Which part of a report is the text a model learns from (``--sections``)."""

    FINDINGS = "findings"
    IMPRESSION = "impression"
    BOTH = "both"


#: Header spellings (lower case, single spaces) that mean findings or impression, typos seen in MIMIC-CXR included.
SECTION_ALIASES: dict[str, str] = {
    **{
        k: "findings"
        for k in (
            "findings",
            "finding",
            "findngs",
            "findins",
            "findnings",
            "finidngs",
            "findgings",
            "findindgs",
            "reference findings",
            "findings on chest radiograph",
        )
    },
    **{
        k: "impression"
        for k in (
            "impression",
            "impressions",
            "impresson",
            "impresion",
            "impession",
            "imprssion",
            "imprression",
            "imoression",
            "impressoin",
            "imperssion",
            "mpression",
            "conclusion",
            "conclusions",
            "findings and impression",
            "findings/impression",
            "findings / impression",
            "impression and findings",
        )
    },
    **{
        k: "indication"
        for k in (
            "indication",
            "indications",
            "reason for examination",
            "reason for exam",
            "clinical indication",
            "idication",
        )
    },
    **{
        k: "history"
        for k in ("history", "clinical history", "clinical information", "patient history", "pfi")
    },
    **{
        k: "comparison"
        for k in (
            "comparison",
            "comparisons",
            "comparison exam",
            "comparison film",
            "reference exam",
            "comparision",
            "comparsion",
            "comparrison",
        )
    },
    **{k: "examination" for k in ("examination", "exam", "type of examination", "procedure")},
    **{k: "technique" for k in ("technique", "techniques")},
    **{k: "notification" for k in ("notification", "notifications")},
    **{k: "recommendations" for k in ("recommendation", "recommendations", "recommendation(s)")},
    **{k: "wet read" for k in ("wet read", "wetread")},
    **{k: "addendum" for k in ("addendum",)},
}
#: Sections whose text is bookkeeping, never report content for the last-paragraph fallback.
META_SECTIONS = frozenset(
    {
        "indication",
        "history",
        "comparison",
        "examination",
        "technique",
        "notification",
        "recommendations",
        "wet read",
        "addendum",
    }
)

_HEADER = re.compile(r"^([A-Z][A-Z0-9 ,&/()'\-]{0,60}?)\s*:(.*)$")
_MARKER = re.compile(r"^(?:FINAL|PRELIMINARY)?\s*(ADDENDUM|REPORT)\s*$")
_PHI = re.compile(r"_{3,}")


@dataclass(frozen=True)
class ReportSections:
    """A parsed MIMIC-CXR report. Texts are single-line, ``""`` when absent.

    ``sections``: every section of the original report by normalised name (``preamble`` for text before the first
    header), in order.
    """

    findings: str = ""
    impression: str = ""
    last_paragraph: str = ""
    addendum: str = ""
    sections: dict[str, str] = field(default_factory=dict)


def clean_text(text: str) -> str:
    """Collapse whitespace; runs of underscores (PHI) become one ``___`` token."""
    text = _PHI.sub(" ___ ", text)
    text = re.sub(r"\s+", " ", text).strip()
    # "___ ." / "___ ," read better as "___." / "___,"
    return re.sub(r"___ ([.,;:)])", r"___\1", text)


def _normalise_header(name: str) -> str:
    key = re.sub(r"\s+", " ", name.strip().lower())
    return SECTION_ALIASES.get(key, key)


def _is_header(name: str) -> bool:
    letters = [c for c in name if c.isalpha()]
    return len(letters) >= 2 and name == name.upper()


@dataclass
class _Doc:
    kind: str  # "report" or "addendum"
    # (section name, paragraphs: list of list of lines)
    sections: list[tuple[str, list[list[str]]]] = field(default_factory=list)

    def start(self, name: str) -> None:
        self.sections.append((name, [[]]))

    def add_line(self, line: str) -> None:
        if not self.sections:
            self.start("preamble")
        paragraphs = self.sections[-1][1]
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])

    def texts(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, paragraphs in self.sections:
            text = clean_text(" ".join(" ".join(p) for p in paragraphs if p))
            if text:
                out[name] = f"{out[name]} {text}" if name in out else text
        return out

    def last_paragraph(self) -> str:
        """The last non-empty paragraph, unless it is the header paragraph of a bookkeeping section
        (``COMPARISON: ___``); later paragraphs of such a section are free text and count."""
        for name, paragraphs in reversed(self.sections):
            for i in range(len(paragraphs) - 1, -1, -1):
                text = clean_text(" ".join(paragraphs[i]))
                if not text:
                    continue
                if name in META_SECTIONS and i == 0:
                    break
                return text
        return ""


def parse_mimic_report(text: str) -> ReportSections:
    """Split a MIMIC-CXR report into sections; see the module docstring for the rules."""
    if not isinstance(text, str):
        raise InvalidReportError(f"a report must be text, got {type(text).__name__}")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    docs: list[_Doc] = [_Doc("report")]
    for raw in lines:
        line = raw.strip()
        marker = _MARKER.match(line)
        if marker:
            docs.append(_Doc("addendum" if marker.group(1) == "ADDENDUM" else "report"))
            continue
        header = _HEADER.match(line)
        if header and _is_header(header.group(1)):
            name = _normalise_header(header.group(1))
            doc = docs[-1]
            if name == "addendum" and doc.kind == "report" and any(n != "preamble" for n, _ in doc.sections):
                # An ADDENDUM: header after a report's sections starts an addendum of its own.
                docs.append(_Doc("addendum"))
                doc = docs[-1]
            doc.start(name)
            rest = header.group(2).strip()
            if rest:
                doc.add_line(rest)
            continue
        docs[-1].add_line(line)

    report_docs = [d for d in docs if d.kind == "report" and d.sections]
    addendum_docs = [d for d in docs if d.kind == "addendum" and d.sections]
    main = _Doc("report", [s for d in report_docs for s in d.sections])
    sections = main.texts()
    addendum_texts = [" ".join(d.texts().values()) for d in addendum_docs]
    addendum = clean_text(" ".join(t for t in addendum_texts if t))
    findings, impression = sections.get("findings", ""), sections.get("impression", "")
    last = main.last_paragraph()
    if not findings and not impression and addendum_docs:
        # The original report has neither section; an addendum that has them is the best text there is.
        for d in addendum_docs:
            t = d.texts()
            findings = findings or t.get("findings", "")
            impression = impression or t.get("impression", "")
        if not last:
            last = next((d.last_paragraph() for d in reversed(addendum_docs) if d.last_paragraph()), "")
    return ReportSections(
        findings=findings, impression=impression, last_paragraph=last, addendum=addendum, sections=sections
    )


def report_text(
    sections: ReportSections | IUReport,
    which: ReportSection | str = ReportSection.FINDINGS,
    *,
    fallback: bool = True,
) -> str:
    """The text for ``which`` (findings, impression, or both joined by a space); ``""`` when there is none.

    With ``fallback`` a report that has *neither* findings nor impression gives its last paragraph (MIMIC only;
    IU reports have no last-paragraph fallback).
    """
    which = ReportSection(which)
    findings, impression = sections.findings.strip(), sections.impression.strip()
    if which is ReportSection.FINDINGS:
        text = findings
    elif which is ReportSection.IMPRESSION:
        text = impression
    else:
        text = " ".join(t for t in (findings, impression) if t)
    if not text and fallback and not findings and not impression:
        text = getattr(sections, "last_paragraph", "").strip()
    return text


def missing_text_reason(sections: ReportSections | IUReport, which: ReportSection | str) -> str:
    """Why :func:`report_text` is empty, for ``skipped.csv``."""
    which = ReportSection(which)
    if which is ReportSection.FINDINGS:
        return "report has no FINDINGS section"
    if which is ReportSection.IMPRESSION:
        return "report has no IMPRESSION section"
    return "report has neither a FINDINGS nor an IMPRESSION section"


# ----------------------------------------------------------------------------------------------- IU X-ray (Open-i)


@dataclass(frozen=True)
class IUReport:
    """One IU X-ray report from Open-i XML.

    ``uid``: ``CXR<n>`` (Open-i's uId, one per patient and study); ``iuxr_id``: the number alone; ``image_ids``:
    the ``parentImage`` ids, which are the PNG file stems (``CXR1_1_IM-0001-3001``); ``mesh_major`` /
    ``mesh_automatic``: the MeSH terms (``Opacity/lung/base/left/mild``), an independent reference for labelers.
    """

    uid: str
    iuxr_id: str
    findings: str
    impression: str
    comparison: str = ""
    indication: str = ""
    image_ids: tuple[str, ...] = ()
    mesh_major: tuple[str, ...] = ()
    mesh_automatic: tuple[str, ...] = ()
    source: str = ""


def parse_openi_xml(xml: str | bytes | Path) -> IUReport:
    """Parse one Open-i XML report (its text, its bytes or a path to it)."""
    source = ""
    if isinstance(xml, Path) or (isinstance(xml, str) and not xml.lstrip().startswith("<")):
        path = Path(xml)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        source = str(path)
        xml = path.read_bytes()
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InvalidReportError(f"{source or 'report'}: malformed Open-i XML ({exc})") from None
    uid_el = root.find("uId")
    if uid_el is None or not uid_el.get("id"):
        raise InvalidReportError(f"{source or 'report'}: Open-i XML without <uId id=...>")
    texts: dict[str, str] = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().upper()
        text = clean_text("".join(el.itertext()))
        if label and text:
            texts[label] = f"{texts[label]} {text}" if label in texts else text
    iuxr = root.find("IUXRId")
    mesh = root.find("MeSH")

    def terms(tag: str) -> tuple[str, ...]:
        if mesh is None:
            return ()
        return tuple(clean_text(e.text or "") for e in mesh.findall(tag) if (e.text or "").strip())

    return IUReport(
        uid=uid_el.get("id").strip(),
        iuxr_id=(iuxr.get("id") if iuxr is not None else "") or "",
        findings=texts.get("FINDINGS", ""),
        impression=texts.get("IMPRESSION", ""),
        comparison=texts.get("COMPARISON", ""),
        indication=texts.get("INDICATION", ""),
        image_ids=tuple(p.get("id") for p in root.iter("parentImage") if p.get("id")),
        mesh_major=terms("major"),
        mesh_automatic=terms("automatic"),
        source=source,
    )


def torchxrayvision_data_dir() -> Path:
    """``Path(torchxrayvision.__file__).parent / "data"``, found without importing torchxrayvision (4 s)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "torchxrayvision is not installed; its data folder holds the IU X-ray reports"
        )
    return Path(spec.origin).parent / "data"


def default_iu_reports_tgz() -> Path:
    """torchxrayvision's copy of the Open-i reports (``NLMCXR_reports.tgz``, 3,955 reports, CC BY-NC-ND)."""
    return torchxrayvision_data_dir() / "NLMCXR_reports.tgz"


def _member_key(name: str) -> tuple[int, str]:
    stem = Path(name).stem
    return (int(stem), stem) if stem.isdigit() else (1 << 30, stem)


def iter_iu_reports(tgz_path: str | Path | None = None) -> Iterator[IUReport]:
    """Every report of an Open-i ``.tgz`` (default: torchxrayvision's), in report-number order.

    A folder of ``*.xml`` files (e.g. an extracted ``ecgen-radiology/``) is accepted too.
    """
    path = Path(tgz_path) if tgz_path is not None else default_iu_reports_tgz()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(path.rglob("*.xml"), key=lambda p: _member_key(p.name))
        for f in files:
            yield parse_openi_xml(f)
        return
    with tarfile.open(path, "r:*") as tf:
        # Read in archive order (seeking backwards in a gzip stream restarts decompression), then sort.
        blobs: dict[str, bytes] = {}
        for m in tf:
            if m.isfile() and m.name.endswith(".xml"):
                fh = tf.extractfile(m)
                if fh is not None:
                    blobs[m.name] = fh.read()
    for name in sorted(blobs, key=_member_key):
        report = parse_openi_xml(blobs[name])
        yield IUReport(**{**report.__dict__, "source": f"{path.name}:{name}"})
