"""Report parsing: MIMIC-CXR-style text (invented sentences) and IU X-ray Open-i XML."""

from __future__ import annotations

import tarfile

import pytest

from medvl.data.reports import (
    ReportSection,
    default_iu_reports_tgz,
    iter_iu_reports,
    missing_text_reason,
    parse_mimic_report,
    parse_openi_xml,
    report_text,
)
from medvl.errors import InvalidReportError

FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___M with shortness of breath.
 
 COMPARISON:  ___
 
 FINDINGS: 
 
 The heart is mildly enlarged.  There is a small left pleural
 effusion.  No pneumothorax.
 
 IMPRESSION: 
 
 1.  Mild cardiomegaly.
 2.  Small left effusion.
"""


def test_full_report():
    r = parse_mimic_report(FULL)
    assert (
        r.findings == "The heart is mildly enlarged. There is a small left pleural effusion. No pneumothorax."
    )
    assert r.impression == "1. Mild cardiomegaly. 2. Small left effusion."
    assert r.sections["indication"] == "___ M with shortness of breath."
    assert r.sections["comparison"] == "___"
    assert r.sections["examination"] == "CHEST (PA AND LAT)"
    assert r.addendum == ""
    assert r.last_paragraph == r.impression
    assert report_text(r, "findings") == r.findings
    assert report_text(r, ReportSection.IMPRESSION) == r.impression
    assert report_text(r, "both") == f"{r.findings} {r.impression}"


def test_addendum_on_top_is_kept_apart():
    text = " FINAL ADDENDUM\n ADDENDUM:\n The findings were telephoned to Dr. ___ at 14:20.\n \n" + FULL
    r = parse_mimic_report(text)
    assert r.addendum == "The findings were telephoned to Dr. ___ at 14:20."
    assert r.findings.startswith("The heart is mildly enlarged.") and "telephoned" not in r.findings
    assert r.impression.endswith("Small left effusion.")


def test_addendum_used_only_when_the_report_has_no_sections():
    text = (
        " FINAL ADDENDUM\n ADDENDUM:\n IMPRESSION: Right upper lobe nodule, new.\n \n FINAL REPORT\n"
        " INDICATION: cough\n"
    )
    r = parse_mimic_report(text)
    assert r.impression == "Right upper lobe nodule, new."


def test_headers_text_on_same_line_typos_and_crlf():
    text = "FINDINGS: Lungs are clear.\r\nNo effusion.\r\n\r\nIMPRESSON:  Normal.\r\n"
    r = parse_mimic_report(text)
    assert r.findings == "Lungs are clear. No effusion." and r.impression == "Normal."
    r = parse_mimic_report(" CONCLUSION: Stable.\n")
    assert r.impression == "Stable."
    r = parse_mimic_report(" FINDINGS AND IMPRESSION:\n No acute process.\n")
    assert r.impression == "No acute process." and r.findings == ""


def test_lowercase_colon_lines_are_not_headers():
    r = parse_mimic_report(" FINDINGS:\n Tip of the tube: 4 cm above the carina.\n Note: no effusion.\n")
    assert r.findings == "Tip of the tube: 4 cm above the carina. Note: no effusion."


def test_phi_placeholder_kept_as_one_token():
    r = parse_mimic_report(" FINDINGS: Compared to ____ there is a ___-cm nodule, seen by Dr.___.\n")
    assert r.findings == "Compared to ___ there is a ___ -cm nodule, seen by Dr. ___."
    assert "____" not in r.findings


def test_missing_sections_and_last_paragraph_fallback():
    r = parse_mimic_report(" FINAL REPORT\n INDICATION:  fever.\n \n IMPRESSION: \n \n No pneumonia.\n")
    assert r.findings == "" and r.impression == "No pneumonia."
    assert report_text(r, "findings") == ""  # impression present: no fallback for findings
    assert missing_text_reason(r, "findings") == "report has no FINDINGS section"
    assert report_text(r, "both") == "No pneumonia."
    plain = parse_mimic_report(
        " FINAL REPORT\n INDICATION: chest pain\n \n PA and lateral views.\n \n"
        " The lungs are clear.  No effusion.\n"
    )
    assert plain.findings == plain.impression == ""
    assert plain.last_paragraph == "The lungs are clear. No effusion."
    for which in ("findings", "impression", "both"):
        assert report_text(plain, which) == "The lungs are clear. No effusion."
    assert report_text(plain, "findings", fallback=False) == ""
    only_meta = parse_mimic_report(" INDICATION: cough\n COMPARISON: ___\n")
    assert only_meta.last_paragraph == "" and report_text(only_meta, "both") == ""
    assert parse_mimic_report("").findings == ""
    with pytest.raises(InvalidReportError):
        parse_mimic_report(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------- Open-i

OPENI = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <uId id="CXR90001"/>
   <IUXRId id="90001"/>
   <MedlineCitation><Article><Abstract>
      <AbstractText Label="COMPARISON">None.</AbstractText>
      <AbstractText Label="INDICATION">XXXX-year-old with cough</AbstractText>
      <AbstractText Label="FINDINGS">Heart size is normal.   Small right
        pleural effusion.</AbstractText>
      <AbstractText Label="IMPRESSION">Right effusion.</AbstractText>
   </Abstract></Article></MedlineCitation>
   <MeSH>
      <major>Pleural Effusion/right/small</major>
      <automatic>pleural effusion</automatic>
   </MeSH>
   <parentImage id="CXR90001_IM-0001-1001"><figureId>F1</figureId></parentImage>
   <parentImage id="CXR90001_IM-0001-2001"><figureId>F2</figureId></parentImage>
</eCitation>
"""


def test_parse_openi_xml_text_and_path(tmp_path):
    r = parse_openi_xml(OPENI)
    assert r.uid == "CXR90001" and r.iuxr_id == "90001"
    assert r.findings == "Heart size is normal. Small right pleural effusion."
    assert r.impression == "Right effusion." and r.indication == "XXXX-year-old with cough"
    assert r.image_ids == ("CXR90001_IM-0001-1001", "CXR90001_IM-0001-2001")
    assert r.mesh_major == ("Pleural Effusion/right/small",) and r.mesh_automatic == ("pleural effusion",)
    (tmp_path / "1.xml").write_text(OPENI)
    assert parse_openi_xml(tmp_path / "1.xml").findings == r.findings
    assert parse_openi_xml(str(tmp_path / "1.xml")).uid == "CXR90001"
    assert parse_openi_xml(OPENI.encode()).uid == "CXR90001"
    with pytest.raises(InvalidReportError, match="malformed"):
        parse_openi_xml("<eCitation><uId id='x'/>")
    with pytest.raises(InvalidReportError, match="uId"):
        parse_openi_xml("<eCitation/>")


def test_all_iu_reports_parse():
    reports = list(iter_iu_reports())
    assert len(reports) == 3955
    assert len({r.uid for r in reports}) == 3955
    assert sum(1 for r in reports if not r.findings and not r.impression) == 28
    assert sum(len(r.image_ids) for r in reports) == 7470
    assert sum(1 for r in reports if r.mesh_major) > 3900
    first = reports[0]
    assert first.uid == "CXR1" and first.image_ids == ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")
    assert first.findings.startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert report_text(first, "both").endswith(first.impression)


def test_iu_reports_from_a_folder(tmp_path):
    with tarfile.open(default_iu_reports_tgz()) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(("/1.xml", "/2.xml", "/10.xml"))]
        # The "data" filter (safe extraction) exists from Python 3.11.4 on; older 3.11 patch releases lack it.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp_path, members=members, **safe)
    reports = list(iter_iu_reports(tmp_path / "ecgen-radiology"))
    assert [r.uid for r in reports] == ["CXR1", "CXR2", "CXR10"]
