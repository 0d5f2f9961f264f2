"""GET /debug/engine exists only with `debug_endpoints`, sits behind the API key, and reports
the engine's check, taken between two steps."""

from __future__ import annotations


def test_no_debug_route_by_default(fake_server):
    fake_server.assert_error(fake_server.get("/debug/engine"), 404, code="not_found")


def test_the_check_sees_running_requests(make_fake_server):
    s = make_fake_server(debug_endpoints=True, api_key="sk-debug")
    s.core.pause()
    with s.client() as c:
        assert c.get("/debug/engine", headers={"Authorization": ""}).status_code == 401
        idle = s.engine_check()
        assert idle == {"num_running": 0, "num_waiting": 0, "num_blocks": 0,
                        "num_free_blocks": 0, "problem": None}
        with c.stream("POST", "/v1/completions",
                      json={"model": s.model_name, "prompt": "Once", "max_tokens": 4,
                            "stream": True}) as r:
            s.wait_engine(lambda core: core.added)
            s.core.allow(1)  # the step that admits it; the check rides on the next report
            s.wait_engine(lambda core: core.num_steps == 1)
            assert s.engine_check()["num_running"] == 1
            s.core.resume()
            r.read()
    assert s.wait_settled()["problem"] is None
