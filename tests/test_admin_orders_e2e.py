"""An order paid through the (fake) NOWPayments IPN, as the admin panel shows it: the order
with its processor's status history, its key's ledger, and the credit sold on the overview."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tests.admin_support import AdminClient, set_admin_password
from tests.payments_harness import payments_env


async def test_a_paid_order_in_the_panel(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str, tmp_path: Path
):
    async with payments_env(
        database_url=database_factory("admin_orders"), nats_url=nats_url,
        clickhouse_url=clickhouse_url, data_dir=tmp_path,
    ) as env:  # fmt: skip
        await set_admin_password(env.stack)
        order = await env.new_order("25.00")
        pending = await env.new_order("5.00")
        pid = env.np_payment_id(order["order_id"])
        for status in ("confirming", "confirmed", "sending"):
            assert await env.np.deliver(env.np.set_status(pid, status)) == 200
        assert await env.np.deliver(env.np.pay(pid)) == 200

        async with AdminClient(env.stack) as admin:
            await admin.login()
            page = (await admin.get("/admin/orders")).text
            assert order["order_id"] in page and pending["order_id"] in page
            row = page.split(f'id="order-{order["order_id"]}"')[1].split("</details>")[0]
            assert "finished" in row and "$25.00" in row and str(pid) in row
            history = re.findall(r"<tr><td>[^<]+</td><td>([a-z_]+)</td>", row)
            assert history[0] == "waiting" and history[-1] == "finished"
            assert {"confirming", "sending"} <= set(history)
            finished = (await admin.get("/admin/orders", params={"status": "finished"})).text
            assert order["order_id"] in finished and pending["order_id"] not in finished

            key_link = re.search(r'href="(/admin/keys/\d+)"', row)
            assert key_link is not None
            key_page = (await admin.get(key_link.group(1))).text
            assert "payment" in key_page and "+25.00" in key_page
            overview = (await admin.get("/admin/", params={"range": "24h"})).text
            assert re.search(r"Credit sold</div><div class=\"value\">\$25.00<", overview)
