"""Redis Cluster as the event bus: three masters on loopback, sharded pub/sub, every key of a job
on one slot. The broker stays the session's standalone Redis."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import sseclient
from redis.cluster import RedisCluster

from producer import AsyncClient, Client, EventType
from producer.devservers import Process, RedisServer, free_port, start_worker, wait_worker_ready
from producer.mock_upstream import generate
from producer.protocol import Keys
from producer.settings import Settings
from tests.conftest import Fleet, _start_gateway, marker
from tests.test_pipeline import assert_well_formed, token_text

pytestmark = pytest.mark.slow


class Cluster:
    def __init__(self, run_dir: Path) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(3):
            directory = run_dir / f"cluster-{i}"
            directory.mkdir()
            # The cluster bus port is set explicitly: the default (port + 10000) may not exist.
            extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                str(free_port()),
            ]
            self.nodes.append(RedisServer(directory=directory, extra=extra).start())
        try:
            self._create()
        except BaseException:
            self.stop()
            raise

    def _create(self) -> None:
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is needed to create the cluster (Debian's redis-tools)"
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(self._ok(node.port) for node in self.nodes):
            assert time.monotonic() < deadline, "cluster never reached state ok"
            time.sleep(0.1)

    @staticmethod
    def _ok(port: int) -> bool:
        client = redis.Redis(port=port)
        try:
            info = client.execute_command("CLUSTER INFO")
            return "cluster_state:ok" in str(info) or (
                isinstance(info, dict) and info.get("cluster_state") == "ok"
            )
        finally:
            client.close()

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def node_port_of(self, key: str) -> int:
        client = RedisCluster(host="127.0.0.1", port=self.nodes[0].port)
        try:
            return int(client.get_node_from_key(key).port)
        finally:
            client.close()

    def ids_on_every_shard(self, keys: Keys, per_shard: int, stem: str) -> list[str]:
        """Job ids whose keys land ``per_shard`` on each node, taken in turn (random ids would
        miss one of three shards in about one set of 12 in 43)."""
        client = RedisCluster(host="127.0.0.1", port=self.nodes[0].port)
        by_port: dict[int, list[str]] = {node.port: [] for node in self.nodes}
        try:
            for _ in range(10_000):
                if all(len(ids) >= per_shard for ids in by_port.values()):
                    break
                job_id = f"{stem}-{secrets.token_hex(4)}"
                ids = by_port[int(client.get_node_from_key(keys.channel(job_id)).port)]
                if len(ids) < per_shard:
                    ids.append(job_id)
        finally:
            client.close()
        return [job_id for row in zip(*by_port.values(), strict=True) for job_id in row]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster_fleet(run_dir: Path, fleet: Fleet) -> Iterator[tuple[Cluster, dict[str, str]]]:
    cluster = Cluster(run_dir)
    env = {
        **fleet.env,
        "TOKENRELAY_REDIS_URL": cluster.url,
        "TOKENRELAY_BROKER_URL": fleet.settings.redis_url,
        "TOKENRELAY_PREFIX": "trcluster",
    }
    process: Process | None = None
    try:
        process = start_worker(
            env, concurrency=50, name="cluster@%h", log_path=run_dir / "worker-cluster.log"
        )
        wait_worker_ready(process)
        yield cluster, env
    finally:
        if process is not None:
            process.stop()
        cluster.stop()


def test_jobs_on_every_shard_reach_sync_and_async_readers(
    cluster_fleet: tuple[Cluster, dict[str, str]],
) -> None:
    cluster, env = cluster_fleet
    settings = Settings.from_env(env)
    with Client(settings=settings) as client:
        prompts = [marker(f"shard{i}") for i in range(12)]
        ids = cluster.ids_on_every_shard(client.keys, 4, "shard")
        jobs = [
            client.submit(
                prompt=p, model="mock?delay_ms=10", max_tokens=30, follow=True, job_id=job_id
            )
            for p, job_id in zip(prompts, ids, strict=True)
        ]
        shards = {cluster.node_port_of(client.keys.channel(job.id)) for job in jobs}
        assert len(shards) == 3, "the jobs' channels should land on all three shards"
        for job in jobs:
            # One job's keys share one slot: the hash tag works.
            slots = {
                RedisCluster.keyslot(client.redis, key) for key in client.keys.job_keys(job.id)
            }
            assert len(slots) == 1
        for prompt, job in zip(prompts, jobs, strict=True):
            events = list(job.events(timeout=30))
            assert_well_formed(events, job.id)
            assert token_text(events) == "".join(generate(prompt, 30)[0])
            late = list(client.subscribe(job.id).events(timeout=10))
            assert late == events
        # Each job joined the queued set (another slot) when created and left it when claimed.
        assert [client.redis.zscore(client.keys.queued, job.id) for job in jobs] == [None] * 12

        def dies(*_: object) -> None:
            raise KeyboardInterrupt  # the producer's process ends between create and enqueue

        client._enqueuer.send = dies  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            client.submit(marker("stranded"), model="mock", max_tokens=3, job_id="strand-c1")
        assert client.redis.zscore(client.keys.queued, "strand-c1") is not None
        client.cancel("strand-c1")

    async def read_async() -> list[str]:
        async with AsyncClient(settings=settings) as aclient:
            ajobs = [
                await aclient.submit(p, model="mock?delay_ms=10", max_tokens=20, follow=True)
                for p in prompts[:6]
            ]
            return list(await asyncio.gather(*(job.text(timeout=30) for job in ajobs)))

    texts = asyncio.run(asyncio.wait_for(read_async(), 60))
    assert texts == ["".join(generate(p, 20)[0]) for p in prompts[:6]]


def test_channels_are_sharded_and_cancel_reaches_the_worker(
    cluster_fleet: tuple[Cluster, dict[str, str]],
) -> None:
    cluster, env = cluster_fleet
    with Client(settings=Settings.from_env(env)) as client:
        job = client.submit(
            prompt=marker("scancel"), model="mock?delay_ms=50", max_tokens=300, follow=True
        )
        channel = client.keys.channel(job.id)
        owner = redis.Redis(port=cluster.node_port_of(channel))
        try:
            assert channel.encode() in owner.execute_command("PUBSUB", "SHARDCHANNELS")
            assert channel.encode() not in owner.execute_command("PUBSUB", "CHANNELS")
        finally:
            owner.close()
        events = []
        for event in job.events(timeout=30):
            events.append(event)
            if event.type is EventType.TOKEN and event.seq == 3:
                client.cancel(job.id)
        assert events[-1].type is EventType.CANCELLED
        assert_well_formed(events, job.id)


def test_the_gateway_serves_jobs_on_every_shard(
    cluster_fleet: tuple[Cluster, dict[str, str]], fleet: Fleet, run_dir: Path
) -> None:
    cluster, env = cluster_fleet
    names = ("TOKENRELAY_REDIS_URL", "TOKENRELAY_BROKER_URL", "TOKENRELAY_PREFIX")
    gateway = _start_gateway("cluster", fleet, run_dir, {name: env[name] for name in names})
    try:
        prompts = [marker(f"gwshard{i}") for i in range(12)]
        keys = Keys(env["TOKENRELAY_PREFIX"])
        ids = cluster.ids_on_every_shard(keys, 4, "gwshard")
        jobs = [
            requests.post(
                gateway.url + "/v1/jobs",
                json={"prompt": p, "model": "mock?delay_ms=10", "max_tokens": 20, "job_id": i},
                timeout=10,
            ).json()
            for p, i in zip(prompts, ids, strict=True)
        ]
        assert len({cluster.node_port_of(keys.channel(job["id"])) for job in jobs}) == 3
        texts: dict[tuple[int, int], str] = {}

        def read(index: int, reader: int) -> None:
            url = gateway.url + jobs[index]["events_url"]
            with requests.get(url, stream=True, timeout=30) as response:
                events = [json.loads(e.data) for e in sseclient.SSEClient(response).events()]  # type: ignore[arg-type]
            assert [e["seq"] for e in events] == list(range(22))
            texts[index, reader] = "".join(e["text"] for e in events if e["type"] == "token")

        threads = [
            threading.Thread(target=read, args=(index, reader))
            for index in range(len(jobs))
            for reader in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        assert texts == {
            (index, reader): "".join(generate(prompts[index], 20)[0])
            for index in range(len(jobs))
            for reader in range(2)
        }
        # A compatibility route too: Together's API, streamed.
        prompt = marker("gwtogether")
        with requests.post(
            gateway.url + "/inference",
            json={"prompt": prompt, "model": "mock", "max_tokens": 8, "stream_tokens": True},
            stream=True,
            timeout=30,
        ) as response:
            data = [e.data for e in sseclient.SSEClient(response).events()]  # type: ignore[arg-type]
        assert data[-1] == "[DONE]"
        text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])
        assert text == "".join(generate(prompt, 8)[0])
        assert requests.get(gateway.url + "/healthz", timeout=10).json()["ok"] is True
    finally:
        gateway.process.stop()
