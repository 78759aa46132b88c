"""The `search` tool: BM25 retrieval over a local corpus (a folder of text files or a JSONL file).

The corpus is read and indexed when the tool is first called, not when it is built, so envs can
declare it cheaply. No network: documents are whatever the user put on disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .base import ToolResult, register_tool

_TOKEN = re.compile(r"\w+", re.UNICODE)


class CorpusError(ValueError):
    """The corpus path is missing, empty or has malformed rows."""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def load_corpus(path: str | Path) -> list[Document]:
    """Documents from a JSONL file (rows with "text", optional "id" and "title") or from every
    .txt / .md file under a folder (the file name is the title)."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"search corpus {p} does not exist")
    docs: list[Document] = []
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.suffix in (".txt", ".md") and f.is_file():
                docs.append(Document(str(f.relative_to(p)), f.stem,
                                     f.read_text(encoding="utf-8", errors="replace")))
    else:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CorpusError(f"{p}:{n}: each row needs a string field 'text'")
            docs.append(Document(str(row.get("id", n)), str(row.get("title", "")), row["text"]))
    if not docs:
        raise CorpusError(f"search corpus {p} has no documents (.txt/.md files or JSONL rows)")
    return docs


class Search:
    """Top-k BM25 passages of a local corpus."""

    name = "search"
    description = "Search the document collection; returns the best matching passages."
    parameters = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for"},
            "k": {"type": "integer", "description": "number of results (1-10, default 3)"},
        },
        "required": ["query"],
    }

    def __init__(self, corpus: str | Path | list[Document] | None = None,
                 snippet_chars: int = 400) -> None:
        self.corpus = corpus
        self.snippet_chars = snippet_chars

    @cached_property
    def _index(self) -> tuple[list[Document], list[set[str]], object]:
        # BM25+ (not Okapi): Okapi's idf is zero or negative for terms in half of a small corpus
        from rank_bm25 import BM25Plus

        if self.corpus is None:
            raise CorpusError("the search tool was built without a corpus; pass "
                              "corpus=<folder or .jsonl> (tools: [{name: search, corpus: ...}])")
        docs = self.corpus if isinstance(self.corpus, list) else load_corpus(self.corpus)
        toks = [_tokens(d.title + " " + d.text) or ["\0"] for d in docs]
        return docs, [set(t) for t in toks], BM25Plus(toks)

    def search(self, query: str, k: int = 3) -> list[tuple[Document, float]]:
        """The best `k` (1-10) documents sharing at least one term with the query."""
        docs, vocab, bm25 = self._index
        q = _tokens(query)
        scores = bm25.get_scores(q)
        hits = [i for i in range(len(docs)) if vocab[i].intersection(q)]
        hits.sort(key=lambda i: -scores[i])
        return [(docs[i], float(scores[i])) for i in hits[: max(1, min(k, 10))]]

    def run(self, args: dict[str, object]) -> ToolResult:
        try:
            hits = self.search(str(args["query"]), int(args.get("k", 3)))
        except CorpusError as e:
            return ToolResult(f"Error: {e}", error=True)
        if not hits:
            return ToolResult("No results.")
        return ToolResult("\n\n".join(
            f"[{i + 1}] {d.title or d.id}: {d.text[: self.snippet_chars]}"
            for i, (d, _) in enumerate(hits)))


register_tool("search", Search)
