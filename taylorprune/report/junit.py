"""JUnit XML for ``taylorprune check``: CI systems render it as test results without any plugin.

One ``<testsuite>`` per check run, one ``<testcase>`` per check, a ``<failure>`` inside each failed one.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from taylorprune.report.check import Verdict

SUITE = "taylorprune.check"


def to_xml(v: Verdict) -> ET.ElementTree:
    failures = sum(not c.passed for c in v.checks)
    suite = ET.Element("testsuite", name=SUITE, tests=str(len(v.checks)), failures=str(failures), errors="0",
                       skipped="0", time="0")
    props = ET.SubElement(suite, "properties")
    for side, result in (("baseline", v.baseline), ("candidate", v.candidate)):
        if result is not None:
            ET.SubElement(props, "property", name=f"{side}.source", value=str(result.get("source", "")))
            for metric, value in (result.get("metrics") or {}).items():
                ET.SubElement(props, "property", name=f"{side}.{metric}", value=repr(value))
    for diff in v.mismatch:
        ET.SubElement(props, "property", name="allowed_mismatch", value=diff)
    for c in v.checks:
        case = ET.SubElement(suite, "testcase", classname=SUITE, name=c.name, time="0")
        if not c.passed:
            failure = ET.SubElement(case, "failure", message=c.detail, type="regression")
            failure.text = f"{c.name} failed (value {c.value}, limit {c.limit}): {c.detail}"
        else:
            ET.SubElement(case, "system-out").text = c.detail
    return ET.ElementTree(suite)


def write_junit(v: Verdict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = to_xml(v)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
