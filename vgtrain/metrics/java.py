"""METEOR and SPICE through the reference implementation's Java tools (the ``pycocoevalcap`` package).

Both metrics are defined by Java programs (METEOR 1.5 with its paraphrase tables; SPICE 1.0 with
Stanford CoreNLP), so vgtrain runs those programs rather than approximating them. Each function
returns ``(score, None)`` or ``(None, reason)`` when it cannot run here; a reason says what to install.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path

# SPICE's parser: pycocoevalcap downloads these on first use (from nlp.stanford.edu).
CORENLP_JAR = "stanford-corenlp-3.6.0.jar"


@functools.cache
def java_problem() -> str | None:
    """Why Java tools cannot run here, or None when they can."""
    java = shutil.which("java")
    if java is None:
        return "no `java` on PATH (install a JRE, e.g. `apt-get install default-jre-headless`)"
    try:
        subprocess.run([java, "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return f"`{java} -version` failed ({error})"
    return None


def package_problem() -> str | None:
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "the pycocoevalcap package is not installed (`pip install pycocoevalcap`, or vgtrain[dev])"
    return None


def meteor(
    candidates: dict[str, list[str]], references: dict[str, list[str]]
) -> tuple[float | None, str | None]:
    """METEOR 1.5 (``-l en -norm``) on tokenized captions, as pycocoevalcap's ``Meteor`` computes it."""
    problem = package_problem() or java_problem()
    if problem:
        return None, f"METEOR needs Java and pycocoevalcap: {problem}"
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        # Line protocol with the JVM: tokenized captions hold no newline that could desynchronise it.
        score, _ = scorer.compute_score(references, candidates)
    except (OSError, ValueError) as error:
        stderr = scorer.meteor_p.stderr.read(2000).decode(errors="replace") if scorer.meteor_p.poll() else ""
        return None, f"METEOR failed ({error}) {stderr.strip()}".strip()
    finally:
        if scorer.lock.locked():  # a failed compute_score keeps it, and the wrapper's __del__ waits on it
            scorer.lock.release()
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score), None


def spice(
    candidates: dict[str, list[str]], references: dict[str, list[str]]
) -> tuple[float | None, str | None]:
    """SPICE 1.0, as pycocoevalcap's ``Spice`` computes it. Never downloads: without the CoreNLP jars
    the reason says how to fetch them once."""
    problem = package_problem() or java_problem()
    if problem:
        return None, f"SPICE needs Java and pycocoevalcap: {problem}"
    import pycocoevalcap.spice.spice as spice_module

    lib = Path(spice_module.__file__).parent / "lib"
    if not (lib / CORENLP_JAR).is_file():
        return None, (
            f"SPICE needs Stanford CoreNLP 3.6.0 ({lib / CORENLP_JAR} is missing); with network access run "
            "`python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'` once"
        )
    try:
        score, _ = spice_module.Spice().compute_score(references, candidates)
    except (OSError, subprocess.CalledProcessError, ValueError) as error:
        return None, f"SPICE failed ({error}); SPICE 1.0 is known to need Java 8"
    return float(score), None
