"""Is a report written in English? The labeler's lexicons and cues are English only.

A report in another language has no English mentions, so the rule labeler would read it
as a normal study ("No Finding"), a confident wrong label. The check is judged on words
that carry meaning, whatever the report's length:

* text mostly in a non-Latin script (CJK, Cyrillic, Arabic, Greek ...) is not English;
* otherwise each word is looked up in two vocabularies: English (function words, and the
  radiology words of radchain's lexicons and cue phrases written the English way, e.g.
  "cardiomegaly", "osseous", "abnormality") and the common words of the other languages
  reports are written in (German, Spanish, French, Italian, Portuguese, Dutch). Words the
  languages share ("no", "normal", "pneumothorax", "de") count for neither;
* English when English words outnumber foreign ones; a text with neither (a lone "XXXX.")
  is too short to judge and passes.

"No pneumothorax. No cardiomegaly. No acute osseous abnormality." passes on "cardiomegaly",
"acute", "osseous", "abnormality"; "Kein Pleuraerguss. Herz normal gross." fails on "kein",
"herz", "gross".
"""

from __future__ import annotations

import re
from functools import lru_cache

_WORDS_RE = re.compile(r"[^\W\d_]+", re.UNICODE)
_ASCII_WORDS_RE = re.compile(r"[a-z]+")

_ENGLISH_FUNCTION = """
the a an of and or is are was were be been being has have had not with without there this that these those
in on at to for from by as into within since than then again both which who may can could should would
it its is are also otherwise now seen noted identified present evidence compared prior previous study exam
interval left right mild small moderate large severe bilateral lungs lung heart clear stable unchanged new
tube line size increased decreased worsening improved improving lower upper lobe base bases silhouette
volumes low cardiac mediastinal contours contour enlarged enlargement opacity opacities effusions effusion
likely suggest suggests suggesting consistent concerning possible possibly minimal trace subtle focal patchy
acute chronic process disease abnormality abnormalities osseous bony structures change changes findings
finding active appearance appears visualized well expanded airspace space spaces chest view views frontal
lateral portable pulmonary vascularity vasculature vascular congestion cardiopulmonary intact unremarkable
degenerative spine thoracic thoracolumbar scoliosis granuloma granulomas calcified calcification nodule
nodules mass masses consolidation atelectasis cardiomegaly edema pneumonia fracture fractures rib ribs
hemidiaphragm diaphragm costophrenic angle angles blunting thickening scarring scar infiltrate hilar
mediastinum trachea midline aorta aortic tortuous catheter pacemaker sternotomy wires clips surgical
""".split()

# Common words of other languages radiology reports are written in. A word English shares
# with them ("no", "normal", "pneumothorax", "de", "a") is removed from both lists below.
_FOREIGN = """
der die das und ist kein keine keinen nicht mit ohne im in den dem des ein eine einer beidseits herz lunge
lungen erguss pleuraerguss nachweis vergrossert vergroessert gross unauffällig unauffaellig regelrecht
infiltrat infiltrate zeichen einer bei links rechts befund befunde kardiopulmonal akut akute
el la los las del sin con se es y hay derrame corazón corazon tamaño tamano signos neumonía neumonia
pulmonar pulmones hallazgos cardiomegalia no hay izquierdo derecho imagen
le les des est pas avec sans une un du et au aux poumons cœur coeur épanchement epanchement pleural
pneumopathie signe cardiomégalie cardiomegalie droite gauche aucun aucune
il lo gli di che e non da con senza polmoni cuore versamento segni polmonare destro sinistro
o os as um uma não nao com sem pulmão pulmao coração coracao derrame sinais esquerdo
het een van en geen niet met zonder long longen hart vocht links rechts
""".split()

_SHARED = frozenset({"no", "normal", "pneumothorax", "thorax", "pleural", "infiltrate", "de",
                     "a", "in", "e", "o", "as", "is", "um", "du", "die", "den", "le", "la", "long", "van",
                     "hart", "links", "con", "se", "es", "il", "lo", "da", "des", "et", "un", "pulmonar",
                     "infiltrat", "signe", "derrame", "en"})
_NON_LATIN_SHARE = 0.3


@lru_cache(maxsize=1)
def _vocabularies() -> tuple[frozenset[str], frozenset[str]]:
    """English words: the function list plus the words of the CheXpert mention phrase files (read
    as text: importing the reader would load spaCy into every ingest batch)."""
    from extractors.resources import LEXICONS

    english = set(_ENGLISH_FUNCTION)
    for path in sorted((LEXICONS / "chexpert" / "phrases" / "mention").glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            english.update(w for w in _WORDS_RE.findall(line.replace("_", " ").lower()) if len(w) > 3)
    foreign = set(_FOREIGN)
    both = english & foreign
    return frozenset(english - foreign - _SHARED), frozenset(foreign - both - _SHARED)


_LETTER_RE = re.compile(r"[^\W\d_]", re.UNICODE)
_LATIN_RE = re.compile(r"[A-Za-z\u00C0-\u024F\u1E00-\u1EFF]")


def _non_latin_share(text: str) -> float:
    if text.isascii():
        return 0.0
    letters = len(_LETTER_RE.findall(text))
    return 1 - len(_LATIN_RE.findall(text)) / letters if letters else 0.0


def looks_english(text: str) -> bool:
    if not isinstance(text, str) or not text.strip():
        return True
    if _non_latin_share(text) > _NON_LATIN_SHARE:
        return False
    english, foreign = _vocabularies()
    low = text.lower()
    words = (_ASCII_WORDS_RE if low.isascii() else _WORDS_RE).findall(low)
    n_english = sum(map(english.__contains__, words))
    n_foreign = sum(map(foreign.__contains__, words))
    return n_english > n_foreign or n_english == n_foreign == 0
