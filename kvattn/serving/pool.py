"""The engine's page pool on the host: free pages, reference counts, and the prefix cache.

The engine decides every page table on the host and hands the device the
tables, lengths and reference counts each step (`kvattn.paged` writes only
into pages a single slot holds, so a shared page is never written).

Prefix caching: a full page of a sequence is keyed by its tokens and every
token before it (a chain of hashes, as vLLM's block hashes). A request whose
prompt starts with cached pages takes them (one more reference each) and
skips that part of its prefill. A cached page that no slot holds stays
cached until its room is needed: pages are handed out from the free list
first, then by evicting the least recently released cached page.

Shape legend:
  NP: pages in the pool
  PS: tokens per page
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np


def page_keys(tokens: Sequence[int], page_size: int, count: int | None = None) -> list[bytes]:
  """The prefix-cache keys of the first `count` full pages of `tokens` (all full pages if None).

  Key i is a 16-byte BLAKE2 digest of key i - 1 and page i's token ids, so
  it names the page's tokens and every token before them.
  """
  full = len(tokens) // page_size if count is None else count
  ids = np.asarray(tokens[:full * page_size], np.int64)
  keys, key = [], b""
  for i in range(full):
    key = hashlib.blake2b(key + ids[i * page_size:(i + 1) * page_size].tobytes(),
                          digest_size=16).digest()
    keys.append(key)
  return keys


class PagePool:
  """NP pages: reference counts, a free list, and full pages cached by prefix.

  Not thread-safe; the engine's step owns it.
  """
  def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
    self.num_pages = num_pages
    self.page_size = page_size
    self.prefix_caching = prefix_caching
    self.refs = np.zeros((num_pages,), np.int32)
    self._free = collections.deque(range(num_pages))
    self._by_key: dict[bytes, int] = {}  # Cached full pages.
    self._key_of: dict[int, bytes] = {}
    # Cached pages that no slot holds, least recently released first.
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.hits = 0  # Pages taken from the prefix cache.

  @property
  def available(self) -> int:
    """Pages `allocate` can hand out now (free, or cached and held by no slot)."""
    return len(self._free) + len(self._evictable)

  @property
  def in_use(self) -> int:
    """Pages some slot holds."""
    return int(np.count_nonzero(self.refs))

  @property
  def cached(self) -> int:
    return len(self._by_key)

  def allocate(self, count: int) -> list[int] | None:
    """`count` pages with one reference each, or None (and nothing taken) when too few."""
    if count > self.available:
      return None
    pages = []
    for _ in range(count):
      if self._free:
        page = self._free.popleft()
      else:
        page, _ = self._evictable.popitem(last=False)
        del self._by_key[self._key_of.pop(page)]
      self.refs[page] = 1
      pages.append(page)
    return pages

  def share(self, pages: Sequence[int]) -> None:
    """One more reference to each page (a fork, or a prefix hit)."""
    for page in pages:
      if self.refs[page] == 0:
        self._evictable.pop(page, None)
      self.refs[page] += 1

  def release(self, pages: Sequence[int]) -> None:
    """One reference less to each page; a page no slot holds is free again, or stays cached."""
    for page in pages:
      if self.refs[page] <= 0:
        raise RuntimeError(f"page {page} released more often than held")
      self.refs[page] -= 1
      if self.refs[page] == 0:
        if page in self._key_of:
          self._evictable[page] = None
        else:
          self._free.append(page)

  def lookup(self, keys: Sequence[bytes]) -> list[int]:
    """The cached pages of the longest prefix of `keys`, taken (one reference each)."""
    if not self.prefix_caching:
      return []
    pages = []
    for key in keys:
      page = self._by_key.get(key)
      if page is None:
        break
      pages.append(page)
    self.share(pages)
    self.hits += len(pages)
    return pages

  def remember(self, key: bytes, page: int) -> None:
    """Caches a full, computed page under its key (a key cached already keeps its page)."""
    if not self.prefix_caching or key in self._by_key or page in self._key_of:
      return
    self._by_key[key] = page
    self._key_of[page] = key

  def check_idle(self) -> None:
    """Raises RuntimeError unless no slot holds a page and every page is free or cached."""
    if self.refs.any() or self.available != self.num_pages:
      raise RuntimeError(f"pages leaked: {self.in_use} held, {self.available} of "
                         f"{self.num_pages} available")
