/* Unit tests for engine/portmap.c without a router: the process moves into a network
 * namespace of its own first (so no SSDP or NAT-PMP packet can leave the machine), where there
 * is no gateway and no IGD. The lab test (tests/integration) covers a real router. */
#include <errno.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "engine/portmap.h"

static int isolated;

static void run_until_attempt(uv_loop_t *loop, struct dg_portmap *pm)
{
    struct dg_portmap_state st;

    for (int i = 0; i < 2000; i++) {
        uv_run(loop, UV_RUN_ONCE);
        dg_portmap_get(pm, &st);
        if (st.attempts > 0)
            return;
    }
    fail_msg("no mapping attempt finished");
}

/* No router: the attempt fails with the reason of each method, nothing is mapped, and stop
 * ends cleanly (the loop has nothing left). */
static void test_no_router(void **state)
{
    uv_loop_t loop;
    struct dg_portmap *pm;
    struct dg_portmap_state st;
    struct dg_portmap_config cfg = {.port = 40000, .natpmp = 1, .upnp = 1};

    (void)state;
    if (!isolated)
        skip();
    assert_int_equal(uv_loop_init(&loop), 0);
    assert_int_equal(dg_portmap_start(&loop, &cfg, &pm), 0);
    run_until_attempt(&loop, pm);
    dg_portmap_get(pm, &st);
    assert_int_equal(st.mapped, 0);
    assert_string_equal(st.method, "");
    assert_int_equal(st.external_tcp, 0);
    assert_non_null(strstr(st.error, "NAT-PMP"));
    assert_non_null(strstr(st.error, "UPnP"));
    dg_portmap_stop(pm);
    assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* Stopping while an attempt runs waits for it and frees everything. */
static void test_stop_while_busy(void **state)
{
    uv_loop_t loop;
    struct dg_portmap *pm;
    struct dg_portmap_config cfg = {.port = 40001, .natpmp = 0, .upnp = 1};

    (void)state;
    if (!isolated)
        skip();
    assert_int_equal(uv_loop_init(&loop), 0);
    assert_int_equal(dg_portmap_start(&loop, &cfg, &pm), 0);
    uv_run(&loop, UV_RUN_NOWAIT); /* the first attempt is queued */
    dg_portmap_stop(pm);
    assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_router),
        cmocka_unit_test(test_stop_while_busy),
    };
    /* Root only: a namespace of our own with nothing in it (not even lo up). */
    isolated = unshare(CLONE_NEWNET) == 0;
    return cmocka_run_group_tests(tests, NULL, NULL);
}
