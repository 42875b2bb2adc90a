"""The CI rehearsal of a GPU session (.ci/gpu_image_lane.sh) expects SUMMARY.txt lines that
benchmarks/gpu_session.sh writes: a stage added to the session must show up in the rehearsal's expectation here,
in seconds, not at the end of a 30-minute CI run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_rehearsal_expects_the_skipped_line_the_session_writes_without_a_gpu():
    session = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    lane = (ROOT / ".ci" / "gpu_image_lane.sh").read_text()
    written = re.findall(r'note "(SKIPPED [^"$]*: no CUDA device)"', session)
    expected = re.findall(r'"\^(SKIPPED [^"]*: no CUDA device)"', lane)
    assert len(written) == 1 and expected == written, (written, expected)
    stages = re.findall(r"^stage (\w+) ", session, re.M)
    skipped = written[0][len("SKIPPED "):-len(": no CUDA device")].split(", ")
    assert set(stages) <= set(skipped), (stages, skipped)  # every GPU stage is named in the line
