"""The strings a GGUF's tokenizer must encode exactly as transformers does: unicode of many
scripts, code, whitespace runs, numbers, contractions, every special token of the tokenizer
inside text, and chat-rendered conversations (system, multi-turn). Over 200 in all, before the
eval prompts that the llama.cpp check adds.
"""

from __future__ import annotations

UNICODE = [
    "café naïve façade coöperate", "Ünïcödé ÀÉÎÕÜ ßẞ", "Привет, как дела?", "Γειά σου Κόσμε", "こんにちは世界、元気ですか",
    "你好，世界！我想在apple工作1314151天～", "안녕하세요 세계", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "កាន់តែពិសេសអាច", "ሰላም ልዑል", "Ծանոթացեք", "გამარჯობა", "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅",
    "🦙🦙🦙 llamas", "👩\u200d👩\u200d👧\u200d👦 family", "🇫🇷🇯🇵 flags", "e\u0301 combining acute", "Z\u0351\u0352\u0353algo",
    "ﬁ ligature and ½ fraction", "ﬀ ﬂ ﬃ ligatures", "¼ ¾ ⅓ ⅞ fractions", "x² y³ H₂O", "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "∀x∈ℝ: x² ≥ 0 ∑ ∫ ∂ ∞ ≠ ≈", "→ ← ↑ ↓ ⇒ ⇔", "«quoted» „German“ “curly” ‘single’", "—em dash – en dash … ellipsis",
    "non\u00a0breaking\u00a0space", "zero\u200bwidth\u200bspace", "soft\u00adhyphen", "tab\u3000ideographic space", "©®™ §¶ †‡ •",
    "€100 £50 ¥300 ₹20 ₿0.5", "°C ‰ µm Å", "Ω ohm ℃ № ℡", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝", "\U0001f600\U0001f603\U0001f604\U0001f601",
    "नमस्ते 🙏 hello 你好 مرحبا", "Ελληνικά and English mixed", "日本語のテキストとEnglish text", "кириллица latin 123",
    "ﷺ ﷽", "ǅ ǈ ǋ titlecase", "İstanbul ıi", "ΣΑΣ σας ς", "a\u0300\u0301\u0302\u0303 stacked", "\u2028line separator\u2029",
]
CODE = [
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "const add = (a, b) => a + b;",
    "#include <stdio.h>\nint main(void) { printf(\"hi\\n\"); }", '{"key": [1, 2, {"nested": null}], "ok": true}',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;", "ls -la | grep '.py$' && echo done",
    "<div class=\"x\"><p>Hello</p></div>", r"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@\w+\.com$", "x = {'a': 1}; y = [*x]",
    "if __name__ == '__main__':\n\tmain()\n", "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "public static void main(String[] args) {}", "    indented four\n        indented eight", "a+=1;b-=2;c*=3;d/=4;e%=5",
    "x != y && y <= z || !w", "// comment\n/* block */\n# hash", "```python\nprint('fenced')\n```", "\\n \\t \\\\ escapes",
    "std::vector<std::string> v{\"a\", \"b\"};", "git commit -m \"fix: handle #42\"", "$HOME/${USER}/.config/*.yaml",
    "@decorator\nclass A(B, metaclass=M): pass", "lambda *args, **kwargs: None", "0x1F 0b1010 0o777 1e-9 3.14j",
]
WHITESPACE = (
    [" " * n for n in range(1, 9)] + ["\n" * n for n in range(1, 6)] + ["\t" * n for n in range(1, 5)]
    + [" \n", "\n ", " \n ", "\n\n \n", "\t \t", " \t\n", "\r\n", "\r\n\r\n", "a  b", "a   b", "a    b", "a\tb", "a\n\nb",
       "  leading", "trailing  ", "  both  ", "word \n  next", "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
       "a \u00a0 b", "end.\n\n\n\nstart", "x" + " " * 16 + "y", "\t\tdef g():\n\t\t\tpass"]
)
NUMBERS = (
    ["3" * n for n in range(1, 11)]
    + ["3.3", "3..3", "3...3", "-42", "+7", "1,000,000", "12:34:56", "2026-12-03", "+1 (555) 010-9999", "v1.2.3-rc.4",
       "100%", "$19.99", "1/2 3/4", "10^6", "3.14159265358979", "007", "1st 2nd 3rd 4th", "MMXXVI", "0.000001", "9999999999999"]
)
PROSE = [
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "Don't, won't, can't, shouldn't've", "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!??????",
    "Hello world", "hello World", "HELLO WORLD", "Hello, world!", " Hello", "Hello ", "The quick brown fox jumps over the lazy dog.",
    "UPPER lower MiXeD", "e-mail co-operate re-enter", "U.S.A. e.g. i.e. etc.", "Mr. Smith's dog's bone", "rock'n'roll",
    "It costs $5 — cheap!", "...and then?!", "(parenthesised) [bracketed] {braced} <angled>", "semi;colon:colon", "a/b\\c|d",
    "Which topic is this sentence about: sports, cooking, weather, technology or music?", "sports", " music", "weather\n",
    "supercalifragilisticexpialidocious", "antidisestablishmentarianism", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababab", "!!!???...,,,;;;", "____init____", "#hashtag @mention",
    "https://example.com/path?q=1&r=two#frag", "user@example.com", "C:\\Users\\name\\file.txt", "/usr/local/bin/python3",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE", "A", "a", ".", "?", "'", "\"",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thanks\n  bye"}],
    [{"role": "user", "content": "Code:\n```py\nprint(1)\n```"}],
    [{"role": "user", "content": "  spaces  around  "}],
    [{"role": "user", "content": "emoji 🦙 and 你好"}],
]


def special_token_texts(tokenizer) -> list[str]:
    """Every special / added token inside text, where a tokenizer must keep it whole."""
    found = []
    for token in sorted({str(t) for t in tokenizer.all_special_tokens} | set(tokenizer.get_added_vocab())):
        found += [token, f"before{token}after", f"{token}\n", f" {token} text"]
    return found


def chat_texts(tokenizer) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        return []
    rendered = []
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            if add_generation_prompt and conversation[-1]["role"] == "assistant":
                continue
            rendered.append(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt))
    return rendered


def texts(tokenizer) -> list[tuple[str, bool]]:
    """(text, add_special_tokens): plain strings both without and with the tokenizer's own
    BOS/EOS handling, special tokens and rendered chats as inference encodes them (no extra BOS)."""
    plain = UNICODE + CODE + WHITESPACE + NUMBERS + PROSE
    return ([(text, False) for text in plain] + [(text, True) for text in plain[::4]]
            + [(text, False) for text in special_token_texts(tokenizer) + chat_texts(tokenizer)])
