"""XMP sidecars photo managers read: our keywords merged into `<image file name>.xmp`, never clobbering.

Written fields:
- `dc:subject`: leaf keywords (a label's keyword, or the label itself);
- `lr:hierarchicalSubject`: keyword paths under a root (`AI|Animals|Dogs|Golden retriever`);
- our namespace `vbsiglip` (URI `http://ns.visual-buffet.org/siglip/1.0/`): model,
  plugin version, global threshold, the keywords we own and each one's
  label, confidence and threshold.

Merge rules: an existing sidecar keeps every other property, node and
attribute (a user's keywords, rating, darktable history...). Only the values
our namespace records as ours are removed before ours are added, and a keyword
the user already has is never taken over, so a new vocabulary drops our stale
keywords and keeps the user's, and a second run with the same tags writes the
same bytes. Sidecars are parsed with the standard library's expat through
`defusedxml` (no DTDs, entities or external references), size-bounded and
UTF-8 only; a sidecar that is refused is left as it is and named in the error.

Why one module of ~500 lines: reading, the fast text path for sidecars that hold
only our record, and the full merge must agree byte for byte on what a sidecar
says, so they share one set of namespace and serialisation helpers here.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.dom import Node, minidom
from xml.etree.ElementTree import ParseError
from xml.parsers.expat import ExpatError

from . import __version__
from .errors import XmpError
from .fileio import write_atomic
from .records import Record, TagDict
from .vocabulary import TagOptions, file_kind

if TYPE_CHECKING:
    from .engine import ImageEmbedding

__all__ = ["NAMESPACE", "PREFIX", "MAX_SIDECAR_BYTES", "Keyword", "keywords_for", "merge",
           "sidecar_path", "read_sidecar", "XmpSink"]

log = logging.getLogger(__name__)

NAMESPACE = "http://ns.visual-buffet.org/siglip/1.0/"
PREFIX = "vbsiglip"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
LR = "http://ns.adobe.com/lightroom/1.0/"
XMLNS = "http://www.w3.org/2000/xmlns/"
MAX_SIDECAR_BYTES = 16 * 1024 * 1024  # darktable's longest edit histories are well under 1 MB
INDENT = " "
CONTAINERS = ("Bag", "Seq", "Alt")
Dom = Any  # a minidom node: its stubs type every child as a union of node kinds; the helpers check kinds

TEMPLATE = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="visual-buffet-siglip">\n'
            f' <rdf:RDF xmlns:rdf="{RDF}">\n  <rdf:Description rdf:about=""/>\n </rdf:RDF>\n</x:xmpmeta>')


@dataclass(frozen=True)
class Keyword:
    """One of our tags as a photo manager keyword."""

    label: str
    confidence: float
    threshold: float
    subject: str
    hierarchical: str


def keywords_for(tags: Sequence[TagDict], options: TagOptions, *, root: str = "AI",
                 limit: int = 15) -> list[Keyword]:
    """Keywords for a record's tags (selected, best first), at most `limit`; an `off` label is never one."""
    prefix = tuple(part for part in root.split("|") if part)
    out: list[Keyword] = []
    for tag in tags:
        entry = options.vocabulary.get(tag["label"])
        if entry.off:
            continue
        if len(out) == limit:
            break
        path = entry.keyword_path or (entry.label,)
        threshold = options.threshold_for(entry.label)
        out.append(Keyword(entry.label, float(tag["confidence"]),
                           options.confidence_threshold if threshold is None else threshold,
                           entry.keyword, "|".join(prefix + path)))
    return out


# --- the merge (pure: bytes in, bytes out) ----------------------------------------------------

def merge(existing: bytes | None, keywords: Sequence[Keyword], *, model: str, threshold: float,
          source: str = "sidecar") -> bytes:
    """The sidecar `existing` (None: a new one) with our keywords and record replaced by these.

    Sidecars that hold nothing but a record of ours (new ones, and every rerun
    or vocabulary change on them) take a fast path that builds the bytes as
    text; it gives exactly what the tree merge gives (the tests compare them),
    which every other sidecar still goes through.
    """
    fresh = _fresh(keywords, model=model, threshold=threshold)
    if fresh is not None and (existing is None or existing == fresh or (keywords and _ours_alone(existing))):
        return fresh
    return _merge_tree(existing, keywords, model=model, threshold=threshold, source=source)


def _merge_tree(existing: bytes | None, keywords: Sequence[Keyword], *, model: str, threshold: float,
                source: str) -> bytes:
    """The merge on a namespace-aware tree: any sidecar, keeping all that is not ours."""
    doc = _parse(existing, source) if existing is not None else minidom.parseString(TEMPLATE)
    root = doc.documentElement  # rdf:RDF is the root or a child of x:xmpmeta
    rdf = next((e for e in (root, *_elements(root)) if (e.namespaceURI, e.localName) == (RDF, "RDF")), None)
    if rdf is None:
        raise XmpError(f"{source}: no rdf:RDF element, so it is not an XMP sidecar; left unchanged")
    descriptions = [node for node in _elements(rdf) if (node.namespaceURI, node.localName) == (RDF, "Description")]
    if not descriptions:
        descriptions = [_append(rdf, _element(rdf, RDF, rdf.prefix or "rdf", "Description"))]
        descriptions[0].setAttributeNS(RDF, descriptions[0].prefix + ":about", "")
    owned = _take_our_record(descriptions)
    home = next((d for d in descriptions for e in _elements(d) if (e.namespaceURI, e.localName) in
                 ((DC, "subject"), (LR, "hierarchicalSubject"))), descriptions[0])
    subjects = _merge_bag(descriptions, home, DC, "dc", "subject", owned.get("subjects", ()),
                          [k.subject for k in keywords], source)
    paths = _merge_bag(descriptions, home, LR, "lr", "hierarchicalSubject", owned.get("hierarchicalSubjects", ()),
                       [k.hierarchical for k in keywords], source)
    _write_our_record(home, keywords, subjects, paths, model=model, threshold=threshold)
    for description in descriptions:  # where declarations may have been added
        _namespace_declarations_first(description)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>'] + [node.toxml() for node in doc.childNodes
                                                           if node.nodeType != Node.DOCUMENT_TYPE_NODE]
    return ("\n".join(parts) + "\n").encode("utf-8")


def _parse(data: bytes, source: str) -> Dom:
    import defusedxml
    import defusedxml.minidom

    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XmpError(f"{source}: not UTF-8 (byte {exc.start}); left unchanged") from None
    try:
        return defusedxml.minidom.parseString(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise XmpError(f"{source}: refused ({exc}): an XMP sidecar has no DTD or entities; left unchanged") from None
    except ExpatError as exc:
        raise XmpError(f"{source}: not well-formed XML ({exc}); left unchanged") from None


def _take_our_record(descriptions: list[Dom]) -> dict[str, list[str]]:
    """Our previous record's ownership lists (subjects, hierarchicalSubjects), removed from the tree."""
    owned: dict[str, list[str]] = {}
    for description in descriptions:
        for name in [a.name for a in description.attributes.values() if a.namespaceURI == NAMESPACE]:
            description.removeAttribute(name)
        for element in _elements(description):
            if element.namespaceURI == NAMESPACE:
                container = _container(element)
                if container is not None:
                    owned.setdefault(element.localName, []).extend(_text(li) for li in _items(container))
                _remove(element)
    return owned


def _merge_bag(descriptions: list[Dom], home: Dom, ns: str, prefix: str, local: str,
               ours_before: Iterable[str], ours_now: list[str], source: str) -> list[str]:
    """Replace our old values of one bag property by `ours_now`; returns the values we added (now ours)."""
    for description in descriptions:
        if description.hasAttributeNS(ns, local):
            raise XmpError(f"{source}: {prefix}:{local} is written as an attribute, which is not an XMP bag; "
                           "left unchanged")
    prop = next((e for d in descriptions for e in _elements(d) if (e.namespaceURI, e.localName) == (ns, local)),
                None)
    if prop is None:
        if not ours_now:
            return []
        prop = _append(home, _element(home, ns, _prefix_for(home, ns, prefix), local))
    container = _container(prop)
    if container is None:
        if _text(prop).strip():
            raise XmpError(f"{source}: {prefix}:{local} is not a bag of keywords; left unchanged")
        for child in list(prop.childNodes):
            prop.removeChild(child)
        container = _append(prop, _element(prop, RDF, _prefix_for(prop, RDF, "rdf"), "Bag"))
    stale = set(ours_before)
    kept = [li for li in _items(container) if _text(li) not in stale]
    present = {_text(li) for li in kept}
    added = [value for value in dict.fromkeys(ours_now) if value not in present]
    rdf = container.prefix or _prefix_for(container, RDF, "rdf")
    items = kept + [_text_element(container, RDF, rdf, "li", value) for value in added]
    if not items:
        _remove(prop)
        return []
    _set_children(container, items)
    return added


def _write_our_record(home: Dom, keywords: Sequence[Keyword], subjects: list[str],
                      paths: list[str], *, model: str, threshold: float) -> None:
    prefix = _prefix_for(home, NAMESPACE, PREFIX)
    rdf = _prefix_for(home, RDF, "rdf")
    for local, value in (("model", model), ("version", __version__), ("threshold", _number(threshold))):
        _append(home, _text_element(home, NAMESPACE, prefix, local, value))
    for local, values in (("subjects", subjects), ("hierarchicalSubjects", paths)):
        if values:
            prop = _append(home, _element(home, NAMESPACE, prefix, local))
            bag = _append(prop, _element(prop, RDF, rdf, "Bag"))
            _set_children(bag, [_text_element(bag, RDF, rdf, "li", value) for value in values])
    if keywords:
        prop = _append(home, _element(home, NAMESPACE, prefix, "keywords"))
        seq = _append(prop, _element(prop, RDF, rdf, "Seq"))
        for keyword in keywords:  # a struct per keyword, its fields as attributes (as darktable's history)
            li = _append(seq, _element(seq, RDF, rdf, "li"))
            for local, value in zip(KEYWORD_FIELDS, _fields(keyword), strict=True):
                li.setAttributeNS(NAMESPACE, f"{prefix}:{local}", value)


def _namespace_declarations_first(element: Dom) -> None:
    """Attributes in the order a parse gives them back (declarations first), so a rerun writes the same bytes."""
    attributes = list(element.attributes.values())
    ordered = sorted(attributes, key=lambda attr: not (attr.name == "xmlns" or attr.name.startswith("xmlns:")))
    if ordered != attributes:
        for attr in attributes:
            element.removeAttributeNode(attr)
        for attr in ordered:
            element.setAttributeNodeNS(attr)


def _number(value: float) -> str:
    return format(value, ".6g")


KEYWORD_FIELDS = ("label", "confidence", "threshold", "subject", "hierarchicalSubject")
Fields = tuple[str, ...]  # one keyword's KEYWORD_FIELDS as written


def _fields(keyword: Keyword) -> Fields:
    return (keyword.label, _number(keyword.confidence), _number(keyword.threshold), keyword.subject,
            keyword.hierarchical)


# --- the fast path: sidecars that hold only our record ---------------------------------------

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ESCAPED = re.compile('[&<>"\t\n\r]')  # what some Python's minidom escapes, in text or attributes
_SCRATCH = minidom.Document()
_FRESH_HEAD = ('<?xml version="1.0" encoding="UTF-8"?>\n' + TEMPLATE.split(' rdf:about=""/>', 1)[0]
               ).encode("utf-8")  # how every sidecar `_fresh` writes starts, up to "<rdf:Description"


def _fresh(keywords: Sequence[Keyword], *, model: str, threshold: float) -> bytes | None:
    """What the tree merge writes for a new sidecar (None: a value XML cannot hold; the tree merge decides)."""
    return _fresh_bytes(model, __version__, _number(threshold), [_fields(k) for k in keywords])


def _fresh_bytes(model: str, version: str, threshold: str, keywords: Sequence[Fields]) -> bytes | None:
    if _NOT_XML.search("".join((model, version, threshold, *(value for k in keywords for value in k)))):
        return None
    lines = []
    if keywords:
        subjects, paths = list(dict.fromkeys(k[3] for k in keywords)), list(dict.fromkeys(k[4] for k in keywords))
        lines += _bag("dc:subject", subjects) + _bag("lr:hierarchicalSubject", paths)
    lines += [f"   <{PREFIX}:{local}>{_escaped(value, False)}</{PREFIX}:{local}>"
              for local, value in (("model", model), ("version", version), ("threshold", threshold))]
    if keywords:
        lines += _bag(f"{PREFIX}:subjects", subjects) + _bag(f"{PREFIX}:hierarchicalSubjects", paths)
        lines += [f"   <{PREFIX}:keywords>", "    <rdf:Seq>"]
        lines += [f"     <rdf:li {_attributes(k)}/>" for k in keywords]
        lines += ["    </rdf:Seq>", f"   </{PREFIX}:keywords>"]
    declarations = (f'xmlns:dc="{DC}" xmlns:lr="{LR}" ' if keywords else "") + f'xmlns:{PREFIX}="{NAMESPACE}"'
    description = "\n".join([f'<rdf:Description {declarations} rdf:about="">', *lines, "  </rdf:Description>"])
    body = TEMPLATE.replace('<rdf:Description rdf:about=""/>', description)
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'.encode()


def _attributes(keyword: Fields) -> str:
    return " ".join(f'{PREFIX}:{local}="{_escaped(value, True)}"'
                    for local, value in zip(KEYWORD_FIELDS, keyword, strict=True))


def _bag(name: str, values: list[str]) -> list[str]:
    return [f"   <{name}>", "    <rdf:Bag>", *(f"     <rdf:li>{_escaped(v, False)}</rdf:li>" for v in values),
            "    </rdf:Bag>", f"   </{name}>"]


@lru_cache(maxsize=8192)
def _escaped(value: str, attribute: bool) -> str:
    """`value` as minidom writes it, by minidom itself (which characters it escapes changed in Python 3.13)."""
    if not _ESCAPED.search(value):
        return value
    if not attribute:
        return str(_SCRATCH.createTextNode(value).toxml())
    element = _SCRATCH.createElement("a")
    element.setAttribute("v", value)
    return str(element.toxml())[len('<a v="'):-len('"/>')]


def _ours_alone(existing: bytes) -> bool:
    """Whether `existing` is exactly what `_fresh` wrote for some keywords (a cheap parse, then a rebuild).

    On such a sidecar the tree merge drops all of it but the layout and puts
    in the new record: the result is the new fresh sidecar (the tests check it).
    """
    import defusedxml
    import defusedxml.ElementTree

    if not existing.startswith(_FRESH_HEAD):  # a sidecar another program wrote: no need to parse it here
        return False
    try:
        root = defusedxml.ElementTree.fromstring(existing, forbid_dtd=True, forbid_entities=True,
                                                 forbid_external=True)
    except (defusedxml.DefusedXmlException, ParseError):
        return False  # the tree merge says why
    description = root.find(f"{{{RDF}}}RDF/{{{RDF}}}Description")
    if description is None:
        return False
    model, version, threshold = (description.findtext(f"{{{NAMESPACE}}}{local}")
                                 for local in ("model", "version", "threshold"))
    keywords = [tuple(li.get(f"{{{NAMESPACE}}}{local}") for local in KEYWORD_FIELDS)
                for li in description.iterfind(f"{{{NAMESPACE}}}keywords/{{{RDF}}}Seq/{{{RDF}}}li")]
    if model is None or version is None or threshold is None or not keywords:
        return False
    if any(value is None for k in keywords for value in k):
        return False
    return _fresh_bytes(model, version, threshold, keywords) == existing


# --- small DOM helpers ------------------------------------------------------------------------

def _elements(node: Dom) -> list[Dom]:
    return [child for child in node.childNodes if child.nodeType == Node.ELEMENT_NODE]


def _container(prop: Dom) -> Dom | None:
    return next((e for e in _elements(prop) if e.namespaceURI == RDF and e.localName in CONTAINERS), None)


def _items(container: Dom) -> list[Dom]:
    return [e for e in _elements(container) if (e.namespaceURI, e.localName) == (RDF, "li")]


def _text(node: Dom) -> str:
    return "".join(child.data for child in node.childNodes if child.nodeType in (Node.TEXT_NODE,
                                                                                 Node.CDATA_SECTION_NODE))


def _indent(node: Dom) -> str:
    """The indentation `node` has (the whitespace before it), or its parent's plus one step."""
    before = node.previousSibling
    if _whitespace(before) and "\n" in before.data:
        return before.data.rsplit("\n", 1)[1]
    parent = node.parentNode
    return _indent(parent) + INDENT if parent is not None and parent.nodeType == Node.ELEMENT_NODE else ""


def _whitespace(node: Dom | None) -> bool:
    return node is not None and node.nodeType == Node.TEXT_NODE and not node.data.strip()


def _prefix_for(node: Dom, uri: str, preferred: str) -> str:
    """A prefix bound to `uri` where `node` is; declared on `node` when there is none."""
    bound: dict[str, str] = {}
    scope: Any = node
    while scope is not None and scope.nodeType == Node.ELEMENT_NODE:
        for attr in scope.attributes.values():
            if attr.name.startswith("xmlns:"):
                bound.setdefault(attr.name[6:], attr.value)
        scope = scope.parentNode
    for prefix, value in bound.items():
        if value == uri:
            return prefix
    prefix, number = preferred, 1
    while prefix in bound:
        prefix, number = f"{preferred}{number}", number + 1
    node.setAttributeNS(XMLNS, f"xmlns:{prefix}", uri)
    return prefix


def _element(parent: Dom, uri: str, prefix: str, local: str) -> Dom:
    """A new element `prefix:local` (`prefix` already bound to `uri` where it goes, see `_prefix_for`)."""
    return parent.ownerDocument.createElementNS(uri, f"{prefix}:{local}")


def _text_element(parent: Dom, uri: str, prefix: str, local: str, value: str) -> Dom:
    element = _element(parent, uri, prefix, local)
    element.appendChild(parent.ownerDocument.createTextNode(value))
    return element


def _append(parent: Dom, child: Dom) -> Dom:
    """Append `child` on its own indented line, before the parent's closing indentation."""
    doc, indent = parent.ownerDocument, _indent(parent)
    last = parent.lastChild
    if _whitespace(last):
        parent.insertBefore(doc.createTextNode("\n" + indent + INDENT), last)
        parent.insertBefore(child, last)
    else:
        parent.appendChild(doc.createTextNode("\n" + indent + INDENT))
        parent.appendChild(child)
        parent.appendChild(doc.createTextNode("\n" + indent))
    return child


def _set_children(container: Dom, items: list[Dom]) -> None:
    """`items` as the container's only children, one an indented line (a pure function of the items)."""
    doc, indent = container.ownerDocument, _indent(container)
    for child in list(container.childNodes):
        container.removeChild(child)
    for item in items:
        container.appendChild(doc.createTextNode("\n" + indent + INDENT))
        container.appendChild(item)
    container.appendChild(doc.createTextNode("\n" + indent))


def _remove(node: Dom) -> None:
    """Remove `node` and the indentation before it."""
    parent = node.parentNode
    if _whitespace(node.previousSibling):
        parent.removeChild(node.previousSibling)
    parent.removeChild(node)


# --- files ------------------------------------------------------------------------------------

def sidecar_path(image: str, xmp_dir: str | os.PathLike[str] | None = None) -> Path:
    """`<image file name>.xmp` beside the image, or at the same place under `xmp_dir`.

    Under `xmp_dir` the tree follows the image's path: relative to the current
    folder when the image is inside it, else its whole absolute path.
    """
    path = Path(image)
    if xmp_dir is None:
        return path.with_name(path.name + ".xmp")
    absolute = Path(os.path.normpath(os.path.abspath(image)))
    try:
        relative = absolute.relative_to(Path.cwd())
    except ValueError:
        relative = absolute.relative_to(absolute.anchor)
    return Path(xmp_dir) / relative.parent / (relative.name + ".xmp")


def read_sidecar(path: Path) -> bytes | None:
    """An existing sidecar's bytes (None when there is none), refused when not a small regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if path.is_symlink():
            raise XmpError(f"{path}: is a symbolic link; not followed, left unchanged") from None
        raise XmpError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise XmpError(f"{path}: is {file_kind(info.st_mode)}, not a sidecar file; left unchanged")
        if info.st_size > MAX_SIDECAR_BYTES:
            raise XmpError(f"{path}: {info.st_size:,} bytes, more than any XMP sidecar needs "
                           f"(at most {MAX_SIDECAR_BYTES:,}); left unchanged")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_SIDECAR_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SIDECAR_BYTES:
        raise XmpError(f"{path}: grew past {MAX_SIDECAR_BYTES:,} bytes while read; left unchanged")
    return data


class XmpSink:
    """Merges each tagged image's keywords into its XMP sidecar; a refused sidecar costs only that image."""

    def __init__(self, options: TagOptions, *, model: str, root: str = "AI", limit: int = 15,
                 xmp_dir: str | os.PathLike[str] | None = None):
        self.options, self.model, self.root, self.limit, self.xmp_dir = options, model, root, limit, xmp_dir
        self.written = self.unchanged = self.failed = 0

    def write(self, path: str, item: ImageEmbedding | None, record: Record) -> None:
        if "error" in record:
            return
        target = sidecar_path(path, self.xmp_dir)
        try:
            if not os.path.isfile(path):
                raise XmpError(f"the image {path!r} is not there (paths in a store are as named when tagged: "
                               "run from the same folder); no sidecar written")
            existing = read_sidecar(target)
            keywords = keywords_for(record["tags"], self.options, root=self.root, limit=self.limit)
            if existing is None and not keywords:  # nothing to say: no new file beside the image
                self.unchanged += 1
                return
            merged = merge(existing, keywords, model=self.model, threshold=self.options.confidence_threshold,
                           source=str(target))
            if merged == existing:
                self.unchanged += 1
                return
            if self.xmp_dir is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, merged)
            self.written += 1
        except (XmpError, OSError) as exc:
            self.failed += 1
            message = str(exc) if isinstance(exc, XmpError) else f"{target}: cannot write it ({exc.strerror or exc})"
            log.error("XMP sidecar of %s: %s", path, message)

    def close(self) -> None:
        log.info("XMP sidecars: %d written, %d already up to date%s", self.written, self.unchanged,
                 f", {self.failed} failed (see the errors above)" if self.failed else "")
