"""The official `openai` and `anthropic` Python SDKs against a live tollgate (started by
tests/sdk.rs, in front of a mock provider). Each check prints one line; the last line is the
plain 'N passed, N failed' summary. Exit status 1 when any check failed."""
import os
import sys
import traceback

import anthropic
import openai

BASE = os.environ["TOLLGATE_URL"]
KEY = os.environ["TOLLGATE_KEY"]
CHAT_ONLY_KEY = os.environ["TOLLGATE_CHAT_ONLY_KEY"]
UNKNOWN_KEY = os.environ["TOLLGATE_UNKNOWN_KEY"]
BROKE_KEY = os.environ["TOLLGATE_BROKE_KEY"]

oa = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0)
an = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0)
MESSAGES = [{"role": "user", "content": "hi"}]

checks = []


def check(fn):
    checks.append(fn)
    return fn


def raises(exc_class, message, call):
    try:
        call()
    except exc_class as e:
        assert message in str(e), f"{message!r} not in {str(e)!r}"
        return e
    raise AssertionError(f"expected {exc_class.__name__}")


@check
def openai_chat_json():
    r = oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert r.choices[0].message.content, r
    assert r.usage.total_tokens == 1500, r.usage


@check
def openai_chat_stream_without_usage():
    chunks = list(oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert chunks, "no chunks"
    assert all(c.usage is None for c in chunks), "a usage chunk the client did not ask for"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"


@check
def openai_chat_stream_with_usage():
    chunks = list(
        oa.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].total_tokens == 10, usage


@check
def openai_responses():
    r = oa.responses.create(model="gpt-4o-mini", input="hi")
    assert r.usage.total_tokens == 70, r.usage
    assert r.output_text == "Hi", r.output_text


@check
def openai_responses_stream():
    events = list(oa.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    done = [e for e in events if e.type == "response.completed"]
    assert len(done) == 1 and done[0].response.usage.total_tokens == 70, events


@check
def openai_embeddings():
    e = oa.embeddings.create(model="text-embedding-3-small", input="hi")
    assert len(e.data) == 1 and e.usage.prompt_tokens == 2, e


@check
def anthropic_messages_json():
    m = an.messages.create(model="claude-3-5-sonnet-20241022", max_tokens=10, messages=MESSAGES)
    assert m.content[0].text, m
    assert m.usage.output_tokens == 50, m.usage


@check
def anthropic_messages_stream():
    with an.messages.stream(model="claude-3-5-sonnet-20241022", max_tokens=10, messages=MESSAGES) as s:
        text = s.get_final_text()
        final = s.get_final_message()
    assert text == "Hello", text
    assert final.usage.output_tokens == 40, final.usage


@check
def openai_refusals_raise_the_sdk_classes():
    bad = openai.OpenAI(base_url=BASE + "/v1", api_key=UNKNOWN_KEY, max_retries=0)
    raises(openai.AuthenticationError, "unknown API key",
           lambda: bad.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    malformed = openai.OpenAI(base_url=BASE + "/v1", api_key="not-a-key", max_retries=0)
    raises(openai.AuthenticationError, "malformed API key",
           lambda: malformed.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    chat_only = openai.OpenAI(base_url=BASE + "/v1", api_key=CHAT_ONLY_KEY, max_retries=0)
    raises(openai.PermissionDeniedError, "may not use path /v1/embeddings",
           lambda: chat_only.embeddings.create(model="text-embedding-3-small", input="hi"))
    raises(openai.APIStatusError, "larger than the limit",
           lambda: oa.chat.completions.create(
               model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 70000}]))
    no_account = openai.OpenAI(base_url=BASE + "/v2", api_key=KEY, max_retries=0)
    raises(openai.InternalServerError, "no upstream account",
           lambda: no_account.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))


@check
def anthropic_refusals_raise_the_sdk_classes():
    bad = anthropic.Anthropic(base_url=BASE, api_key=UNKNOWN_KEY, max_retries=0)
    e = raises(anthropic.AuthenticationError, "unknown API key",
               lambda: bad.messages.create(model="claude-3-5-sonnet", max_tokens=5, messages=MESSAGES))
    assert e.body["type"] == "error" and e.body["error"]["type"] == "authentication_error", e.body
    chat_only = anthropic.Anthropic(base_url=BASE, api_key=CHAT_ONLY_KEY, max_retries=0)
    raises(anthropic.PermissionDeniedError, "may not use path /v1/messages",
           lambda: chat_only.messages.create(model="claude-3-5-sonnet", max_tokens=5, messages=MESSAGES))
    raises(anthropic.RequestTooLargeError, "larger than the limit",
           lambda: an.messages.create(model="claude-3-5-sonnet", max_tokens=5,
                                      messages=[{"role": "user", "content": "x" * 70000}]))


@check
def spend_refusals_are_not_retried():
    # The SDKs' default retries stay on: x-should-retry: false must stop them (tests/sdk.rs
    # counts one row per call).
    broke = openai.OpenAI(base_url=BASE + "/v1", api_key=BROKE_KEY)
    e = raises(openai.RateLimitError, "You exceeded your current quota",
               lambda: broke.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=MESSAGES))
    assert e.code == "insufficient_quota", e.body
    broke_an = anthropic.Anthropic(base_url=BASE, api_key=BROKE_KEY)
    e = raises(anthropic.RateLimitError, "You exceeded your current quota",
               lambda: broke_an.messages.create(model="claude-3-5-sonnet", max_tokens=5, messages=MESSAGES))
    assert e.body["error"]["type"] == "billing_error", e.body


passed = failed = 0
for fn in checks:
    try:
        fn()
        passed += 1
        print(f"ok   {fn.__name__}")
    except Exception:
        failed += 1
        print(f"FAIL {fn.__name__}")
        traceback.print_exc(file=sys.stdout)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
