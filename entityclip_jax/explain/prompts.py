"""Prompt templates that ask an LLM to explain the entities of a news caption.

A template is plain text with a literal {query} placeholder (filled with
str.replace, so other braces need no escaping). Its version, a name plus a short
hash of the text, is part of the cache key: editing a template regenerates.
"""
import dataclasses
import hashlib

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

PLACEHOLDER = "{query}"

# For instruction-tuned models behind a chat endpoint (vLLM, llama.cpp, Ollama, TGI).
INSTRUCTION_TEMPLATE = """\
Explain the named entities in this news photo caption for someone who cannot see the photo. \
In two or three sentences, say who or what each entity is, what it typically looks like \
(face, clothing, shape, colours, landmarks), and what occasion or event the caption describes. \
Answer with the explanation only, as one paragraph, without repeating the caption.

Caption: {query}"""

# For base (non-instruction) models: few-shot, one explanation per line, so
# generation stops at the first newline.
FEW_SHOT_TEMPLATE = """\
Each news photo caption is followed by an explanation of its entities: who or what they are, \
what they look like, and the occasion, in two or three sentences.

Caption: Queen Elizabeth II waves at the crowd from the balcony of Buckingham Palace during Trooping the Colour.
Explanation: Queen Elizabeth II was the British monarch from 1952 to 2022, a small elderly woman with white hair who usually wore a brightly coloured coat and a matching hat. Buckingham Palace is her official London residence, a large pale stone building with a central balcony, and Trooping the Colour is the annual military parade for the sovereign's birthday.

Caption: Lionel Messi lifts the trophy after Argentina beat France in the World Cup final in Lusail.
Explanation: Lionel Messi is an Argentine footballer and the captain of Argentina, a short bearded man wearing the sky-blue and white striped shirt with the number 10. The World Cup final is the deciding match of football's largest tournament, played in December 2022 at the Lusail Stadium in Qatar, where the winners raise a golden trophy.

Caption: Firefighters battle a blaze at Notre-Dame Cathedral in Paris.
Explanation: Notre-Dame is a medieval Gothic cathedral on an island in the Seine in Paris, with two square stone towers, a rose window and flying buttresses. The fire of April 2019 destroyed its roof and wooden spire, while firefighters in helmets sprayed water from cranes and hoses.

Caption: {query}
Explanation:"""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A template plus how to send it: as a chat message or as raw completion text."""
    name: str
    template: str
    chat: bool            # True: send as a user chat message; False: raw text completion
    stop: tuple = ()      # strings that end the answer (cut there, too)

    @property
    def version(self):
        digest = hashlib.sha256(self.template.encode("utf-8")).hexdigest()[:8]
        return f"{self.name}-{digest}"

    def render(self, query):
        return self.template.replace(PLACEHOLDER, query)


INSTRUCTION = Prompt("instruct-v1", INSTRUCTION_TEMPLATE, chat=True)
FEW_SHOT = Prompt("fewshot-v1", FEW_SHOT_TEMPLATE, chat=False, stop=("\n",))


def load_prompt(spec=None, *, chat, name=None):
    """The default template for chat or base models, or the user's own.

    spec: None (the default), a path to a text file, or a template string; a
    custom template must contain {query}. Base-model (non-chat) prompts stop at
    a newline, since they are few-shot with one explanation per line.
    """
    default = INSTRUCTION if chat else FEW_SHOT
    if spec is None:
        return default
    from_file = _is_file(spec)
    if from_file:
        template = storage.path(spec).read_text(encoding="utf-8")
        # Editors add a final newline; a base-model prompt must end right at the answer.
        template = template.rstrip("\n") if not chat else template.strip()
        name = name or storage.path(spec).stem
    else:
        template = spec
        name = name or "custom"
    if PLACEHOLDER not in template:
        source = f"file {spec}" if from_file else "--prompt string"
        raise EntityClipError(f"prompt {source} has no {PLACEHOLDER} placeholder; put {PLACEHOLDER} "
                              "where the caption goes (or pass a path to an existing template file)")
    return Prompt(name, template, chat=chat, stop=default.stop)


def _is_file(spec):
    """spec names a template file (local or gs://); a template string is no file name."""
    try:
        return storage.path(spec).is_file()
    except (OSError, ValueError):  # e.g. a long template string is too long a file name
        return False
