"""`simtune serve`: base + two adapters on the tiny model, over HTTP with the official
openai client (chat, completions, streaming, threads, errors) and as a real CLI process."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import SAMPLE, free_port, run_cli, wait_http

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

CAP = 24  # the engine's max_new_tokens
MSGS = [{"role": "user", "content": "You are an agent. What do you do next?"}]
TEXT = "The quick brown fox"


def _train(ws: Path, model: Path, seed: int, lr: float):
    from simtune import run_tuning

    return run_tuning(
        llm_path=str(model),
        dataset_path=[str(SAMPLE)],
        workspace=str(ws),
        max_steps=2,
        learning_rate=lr,
        per_device_train_batch_size=8,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        seed=seed,
        lora_dropout=0.0,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """Two adapters on the tiny base; high learning rates so their greedy outputs differ
    from each other and from the base."""
    ws = tmp_path_factory.mktemp("ws-serve")
    return ws, _train(ws, tiny_model, 0, 5e-2), _train(ws, tiny_model, 1, 2e-2)


@pytest.fixture(scope="module")
def engine(trained):
    from simtune.serving.engine import Engine

    ws, a, b = trained
    # CPU even where a GPU is present, and fp32 (auto would pick bf16 on a CPU with
    # AVX512-BF16/AMX): greedy answers equal the fp32 reference exactly (bf16 batches may
    # flip near-tied tokens of the random model).
    eng = Engine.load(
        [a.model_id, b.model_id], workspace=ws, max_new_tokens=CAP, device="cpu", precision="fp32"
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    from simtune.serving.server import Server

    with Server(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(trained, tiny_model, engine):
    """What a plain transformers/PEFT model generates greedily for each served name
    (one prompt at a time, no padding): {name: (chat answer, completion answer)}."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = {}
    for name in engine.names:
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        if name != "base":
            model = PeftModel.from_pretrained(model, engine.served[name].adapter_dir)
        model.eval()
        answers = []
        for enc in (
            tok.apply_chat_template(
                MSGS, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ),
            tok(TEXT, return_tensors="pt"),
        ):
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
            answers.append(
                tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            )
        out[name] = tuple(answers)
    return out


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- the engine and name resolution -----------------------------------------------------


def test_models_lists_base_and_both_adapters(client, trained, engine):
    _, a, b = trained
    ids = [m.id for m in client.models.list().data]
    assert ids == [a.model_id, b.model_id, "base"] == engine.names
    assert client.models.retrieve(a.model_id).id == a.model_id


def test_each_name_uses_its_own_adapter(client, engine, reference):
    """HTTP answers equal a plain PEFT model's greedy answers for that adapter, and the
    three served names really answer differently."""
    chats = {r[0] for r in reference.values()}
    assert len(chats) == 3, f"adapters do not change the greedy output: {reference}"
    for name, (chat_ref, text_ref) in reference.items():
        chat = client.chat.completions.create(
            model=name, messages=MSGS, max_tokens=8, temperature=0
        )
        assert chat.model == name
        assert chat.choices[0].message.content == chat_ref
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage.completion_tokens == 8 and chat.usage.prompt_tokens > 0
        comp = client.completions.create(model=name, prompt=TEXT, max_tokens=8, temperature=0)
        assert comp.choices[0].text == text_ref
        assert engine.generate(name, [MSGS, TEXT], max_tokens=8) == [
            engine.generate(name, [MSGS], max_tokens=8)[0],
            engine.generate(name, [TEXT], max_tokens=8)[0],
        ]
        assert engine.generate(name, [MSGS], max_tokens=8)[0].text == chat_ref


def test_concurrent_requests_from_threads_are_batched_across_adapters(client, engine, reference):
    names = list(reference) * 3  # 9 requests, three per served name, sent together
    barrier = threading.Barrier(len(names))
    answers: dict[int, str] = {}
    errors: list[BaseException] = []
    before = dict(engine.stats)

    def ask(i: int, name: str) -> None:
        try:
            barrier.wait()
            r = client.chat.completions.create(
                model=name, messages=MSGS, max_tokens=8, temperature=0
            )
            answers[i] = r.choices[0].message.content
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [answers[i] for i in range(len(names))] == [reference[n][0] for n in names]
    steps = engine.stats["steps"] - before["steps"]
    rows = engine.stats["rows"] - before["rows"]
    assert rows / steps > 1.5, "the requests were not generated in shared batches"
    assert engine.stats["mixed_forwards"] > before["mixed_forwards"], "no batch mixed adapters"


def test_streaming_sync_and_async(client, server, reference):
    name = next(iter(reference))
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=MSGS,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference[name][0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # per token

    async def both() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0)

        async def one(model: str, chat: bool) -> str:
            if chat:
                stream = await aclient.chat.completions.create(
                    model=model, messages=MSGS, max_tokens=8, temperature=0, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream])
            stream = await aclient.completions.create(
                model=model, prompt=TEXT, max_tokens=8, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream])

        try:
            return await asyncio.gather(
                *(one(n, chat) for n in reference for chat in (True, False))
            )
        finally:
            await aclient.close()

    got = asyncio.run(both())
    assert got == [reference[n][i] for n in reference for i in (0, 1)]


def test_max_tokens_over_the_cap_is_clipped_and_stop_strings_cut(client, reference):
    r = client.chat.completions.create(
        model="base", messages=MSGS, max_tokens=10_000, temperature=0
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == CAP
    full = reference["base"][1]
    stop = full[3:6]
    cut = client.completions.create(
        model="base", prompt=TEXT, max_tokens=8, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sampling_parameters_are_accepted(client):
    r = client.chat.completions.create(
        model="base", messages=MSGS, max_tokens=4, temperature=0.9, top_p=0.5
    )
    assert r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("stop", "length")


def test_unknown_model_is_404_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MSGS, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    status, body = _post(
        server.url + "/completions", json.dumps({"model": "nope", "prompt": "x"}).encode()
    )
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "endpoint,body,param",
    [
        ("chat/completions", b"{not json", None),
        ("chat/completions", b"[1, 2]", None),
        ("chat/completions", b'{"model": "base"}', "messages"),
        ("chat/completions", b'{"model": "base", "messages": []}', "messages"),
        ("chat/completions", b'{"model": "base", "messages": [{"content": "x"}]}', "messages[0]"),
        ("chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        ("completions", b'{"model": "base", "prompt": "x", "temperature": 9}', "temperature"),
        ("completions", b'{"model": "base", "prompt": "x", "max_tokens": 0}', "max_tokens"),
        ("completions", b'{"model": "base", "prompt": {"a": 1}}', "prompt"),
        ("completions", b'{"model": "base", "prompt": "x", "n": 3}', "n"),
    ],
)
def test_malformed_requests_are_400(server, endpoint, body, param):
    status, answer = _post(f"{server.url}/{endpoint}", body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param


def test_the_server_survives_bad_requests_and_disconnects(client, server, engine):
    host, port = server.host, server.port
    # A client that hangs up mid-stream ...
    conn = http.client.HTTPConnection(host, port, timeout=10)
    body = {"model": "base", "messages": MSGS, "max_tokens": CAP, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "x"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(6) == b"data: "  # (read decodes the chunked encoding)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # ... a garbage request, a wrong method, an unknown path ...
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\n\r\n\xff\xfe")
    assert urllib.request.urlopen(f"http://{host}:{port}/health").status == 200
    assert _post(server.url + "/models", b"{}")[0] == 405
    assert _post(server.url + "/embeddings", b"{}")[0] == 404
    # ... and everyone else is still served.
    r = client.chat.completions.create(model="base", messages=MSGS, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_an_abandoned_request_leaves_the_batch(engine):
    from simtune.serving.engine import Generation, Sink

    class Quitter(Sink):
        def __init__(self) -> None:
            self.got: list = []
            self.req = None

        def text(self, delta: str) -> None:
            self.got.append(delta)
            engine.cancel(self.req)  # the client "disconnects" after its first piece

        def done(self, gen: Generation) -> None:
            self.got.append(gen)

        def error(self, exc: BaseException) -> None:
            self.got.append(exc)

    before = engine.stats["cancelled"]
    quitter = Quitter()
    quitter.req = engine.submit("base", MSGS, quitter, max_tokens=CAP)
    others = engine.generate("base", [MSGS, TEXT], max_tokens=CAP)
    deadline = time.monotonic() + 10
    while engine.stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats["cancelled"] == before + 1
    assert not any(isinstance(g, Generation) for g in quitter.got)  # never finished
    assert all(g.completion_tokens > 0 for g in others)


def test_api_key_is_required_when_set(engine):
    from simtune.serving.server import Server

    with Server(engine, api_key="sekrit") as srv:
        bad = openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url, api_key="sekrit", max_retries=0)
        assert "base" in [m.id for m in good.models.list().data]
        base = srv.url[: -len("/v1")]
        with urllib.request.urlopen(base + "/health") as r:  # no key needed
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}  # no names
        req = urllib.request.Request(base + "/health", headers={"Authorization": "Bearer sekrit"})
        with urllib.request.urlopen(req) as r:
            assert "base" in json.loads(r.read())["models"]


def test_resolve_served_from_the_mlflow_registry(trained, tiny_model, tmp_path):
    from mlflow import MlflowClient

    from simtune.errors import ModelError
    from simtune.serving.models import resolve_all, resolve_served

    ws, a, b = trained
    name, version = b.registered_model_name, b.registered_model_version
    s = resolve_served(f"{name}/{version}", workspace=ws)
    assert s.name == f"{name}/{version}"
    assert s.training_run_id == b.run_id and s.registered_version == version
    assert Path(s.adapter_dir, "adapter_model.safetensors").is_file()
    assert s.base_model == str(tiny_model.resolve())
    assert resolve_served(f"models:/{name}/{version}", workspace=ws).adapter_dir == s.adapter_dir
    MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").set_registered_model_alias(
        name, "champion", a.registered_model_version
    )
    champion = resolve_served(f"{name}@champion", workspace=ws)
    assert champion.training_run_id == a.run_id
    assert resolve_served(name, workspace=ws).registered_version == max(
        a.registered_model_version, b.registered_model_version, key=int
    )
    local = resolve_served(a.model_id, workspace=ws)
    assert (local.name, local.training_run_id) == (a.model_id, a.run_id)
    assert resolve_served(str(tiny_model), workspace=ws).adapter_dir is None
    with pytest.raises(ModelError, match=r"has no version 99 \(versions: "):
        resolve_served(f"{name}/99", workspace=ws)
    with pytest.raises(ModelError, match="--model: unknown model 'nope'"):
        resolve_served("nope", workspace=ws)

    # An adapter whose base model is gone, and two adapters on different bases.
    moved = tmp_path / "adapter"
    shutil.copytree(a.adapter_path, moved)
    for f, key in (("adapter_config.json", None), ("simtune.json", "base_model")):
        meta = json.loads((moved / f).read_text())
        if key:
            meta[key]["path"] = str(tmp_path / "gone")
        else:
            meta["base_model_name_or_path"] = str(tmp_path / "gone")
        (moved / f).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="base model of adapter .* is missing: .*gone"):
        resolve_served(str(moved), workspace=ws)
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model, other_base)
    meta = json.loads((moved / "simtune.json").read_text())
    meta["base_model"]["path"] = str(other_base)
    (moved / "simtune.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="share one base"):
        resolve_all([a.model_id, str(moved)], workspace=ws)


# --- the command line --------------------------------------------------------------------


def test_cli_serves_a_local_model_id_and_stops_on_sigterm(trained):
    ws, a, _ = trained
    port = free_port()
    exe = Path(sys.executable).with_name("simtune")
    proc = subprocess.Popen(
        [str(exe), "serve", "--model", a.model_id, "--workspace", str(ws)]
        + ["--port", str(port), "--max-new-tokens", "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == [a.model_id, "base"]
        r = c.chat.completions.create(model=a.model_id, messages=MSGS, max_tokens=50, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]


def test_cli_bad_model_and_busy_port_exit_2_with_one_line(trained, tmp_path):
    ws, a, _ = trained
    empty = tmp_path / "empty-ws"
    empty.mkdir()
    r = run_cli("serve", "--model", "sft-nope-1", "--workspace", str(empty), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"simtune: error: --model: unknown model 'sft-nope-1': not a model id in "
        f"{empty.resolve() / 'models' / 'registry.json'}, not a registered MLflow model, "
        "and not a model or adapter directory"
    ]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve", "--model", a.model_id, "--workspace", str(ws), "--port", str(port))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], r.stderr
    r = run_cli("serve", "--model", a.model_id, "--workspace", str(ws), "--backend", "vllm")
    if not _vllm_installed():
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [
            "simtune: error: --backend vllm: vllm is not installed (pip install vllm; it needs "
            "a CUDA GPU); use --backend transformers"
        ]


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def test_vllm_command_is_an_argument_list(trained):
    from simtune.serving.models import resolve_all
    from simtune.serving.vllm import vllm_command

    ws, a, b = trained
    served = resolve_all([a.model_id, b.model_id], workspace=ws)
    cmd = vllm_command(served, host="127.0.0.1", port=8123, max_batch_size=4)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == served["base"].base_model
    assert cmd[cmd.index("--served-model-name") + 1] == "base"
    i = cmd.index("--lora-modules")
    assert cmd[i + 1 : i + 3] == [
        f"{a.model_id}={a.adapter_path}",
        f"{b.model_id}={b.adapter_path}",
    ]
    assert "--enable-lora" in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] in ("8", "16", "32", "64", "128", "256")


def test_vllm_gets_the_key_in_its_environment_and_an_accepted_lora_rank():
    from simtune.errors import ConfigError
    from simtune.serving.vllm import vllm_env, vllm_lora_rank

    env = vllm_env("s3cret", "cuda:1", {"PATH": "/bin", "VLLM_API_KEY": "old"})
    assert env == {"PATH": "/bin", "VLLM_API_KEY": "s3cret", "CUDA_VISIBLE_DEVICES": "1"}
    assert "VLLM_API_KEY" not in vllm_env(None, None, {"VLLM_API_KEY": "old"})
    got = [vllm_lora_rank(r) for r in (1, 8, 9, 16, 17, 33, 100, 200, 300, 320, 321, 512)]
    assert got == [8, 8, 16, 16, 32, 64, 128, 256, 320, 320, 512, 512]
    with pytest.raises(ConfigError, match="rank 513"):
        vllm_lora_rank(513)


def test_serve_defaults_are_declared_once_and_the_command_stays_light():
    from simtune.cli.main import build_parser
    from simtune.config import serve as serve_args
    from simtune.serving import server as serving
    from simtune.serving import vllm

    # One declaration (ServeArgs' module) read by the flags and the server alike.
    assert vllm.BACKENDS is serve_args.BACKENDS
    assert serving.DEFAULT_PORT == serve_args.DEFAULT_PORT
    assert build_parser().parse_args(["serve", "--model", "m"]).port == serve_args.DEFAULT_PORT
    code = (
        "import sys; import simtune.cli.serve, simtune.serving.server; "
        "heavy = {'torch', 'transformers', 'peft', 'aiohttp', 'mlflow'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
