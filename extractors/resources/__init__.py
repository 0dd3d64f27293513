"""Bundled reference data (lexicons, knowledge map, sample reports) with their licences."""

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent
LEXICONS = RESOURCES / "lexicons"
KNOWLEDGE_MAP = RESOURCES / "cxr_findings.yaml"
REPORTS = RESOURCES / "reports"
