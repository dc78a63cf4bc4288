"""The record every source adapter yields, and the report of what it skipped."""
import collections
import dataclasses


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One (image, entity query) pair from a raw dataset release.

    The query is the image caption (METHOD.md); headline and label are used only
    by zero-shot classification; explanation is filled in from an explanation
    cache or the release's CapDsc files before records are written.
    """
    id: str
    query: str
    image_path: str | None = None   # absolute path, already checked to lie inside the dataset root
    image_bytes: bytes | None = None
    headline: str | None = None
    label: str | None = None
    explanation: str | None = None
    source: str = ""                # dataset name, e.g. "n24news"


class SkipReport:
    """Counts and lists records that were skipped, with their reasons.

    Bad input never kills a long job and never vanishes: every skip lands here.
    """

    def __init__(self):
        self.items = []  # (record id or position, reason)
        self.notes = []  # (record id, reason): kept records worth knowing about, e.g. empty_explanation

    def skip(self, record_id, reason):
        self.items.append((str(record_id), reason))

    def note(self, record_id, reason):
        """A record that was KEPT but handled specially; not a skip."""
        self.notes.append((str(record_id), reason))

    def skip_noted(self, record_id, reason, listed_as=None):
        """skip() for a record that may have been noted on its way (empty_explanation) and is skipped
        after all (its image is missing, its id repeats): its latest note goes, since notes count kept
        records. listed_as: the form the skip lists the id in, when not record_id itself."""
        self.skip(record_id if listed_as is None else listed_as, reason)
        for index in range(len(self.notes) - 1, -1, -1):
            if self.notes[index][0] == str(record_id):
                del self.notes[index]
                return

    @property
    def note_counts(self):
        return collections.Counter(reason.split(":")[0] for _, reason in self.notes)

    @property
    def counts(self):
        return collections.Counter(reason.split(":")[0] for _, reason in self.items)

    def __len__(self):
        return len(self.items)

    def to_dict(self):
        return {"skipped": len(self.items), "by_reason": dict(self.counts),
                "records": [{"id": i, "reason": r} for i, r in self.items],
                "noted": len(self.notes), "notes_by_reason": dict(self.note_counts),
                "notes": [{"id": i, "reason": r} for i, r in self.notes]}
