/*
 * kvsift from C: one engine, three requests decoded together (the engine's
 * R-KV, SnapKV of its own, one cancelled mid-way), their text streamed as
 * it comes, what compression did to each, and errors as codes and messages.
 *
 *   cargo build -p kvsift-c
 *   cc -I capi/include examples/c/main.c -L target/debug -lkvsift_c \
 *      -Wl,-rpath,target/debug -o kvsift-c-example
 *   ./kvsift-c-example models/tiny-llama
 *
 * Exits 0 when every check holds.
 */
#include <stdio.h>
#include <string.h>

#include "kvsift.h"

#define CHECK(call)                                                          \
    do {                                                                     \
        KvsiftStatus status_ = (call);                                       \
        if (status_ != KVSIFT_OK) {                                          \
            fprintf(stderr, "%s failed (%d): %s\n", #call, (int)status_,     \
                    kvsift_last_error());                                    \
            return 1;                                                        \
        }                                                                    \
    } while (0)

#define EXPECT(cond)                                                         \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "check failed: %s\n", #cond);                    \
            return 1;                                                        \
        }                                                                    \
    } while (0)

static const char *finish_name(KvsiftFinish f) {
    switch (f) {
    case KVSIFT_STOP: return "stop";
    case KVSIFT_LENGTH: return "length";
    case KVSIFT_CONTEXT: return "context";
    case KVSIFT_CANCELLED: return "cancelled";
    default: return "none";
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
        return 2;
    }
    printf("kvsift %s\n", kvsift_version());

    /* Errors are codes and messages, never a crash. */
    KvsiftEngine *engine = NULL;
    EXPECT(kvsift_engine_open("/no/such/model", NULL, &engine) == KVSIFT_MODEL);
    printf("expected error: %s\n", kvsift_last_error());
    EXPECT(engine == NULL);
    EXPECT(kvsift_engine_open(argv[1], "{\"parallel\": 0}", &engine) ==
           KVSIFT_INVALID_ARGUMENT);
    printf("expected error: %s\n", kvsift_last_error());

    /* The engine compresses with R-KV unless a request says otherwise. */
    CHECK(kvsift_engine_open(
        argv[1],
        "{\"parallel\": 4, \"kv\": {\"method\": \"rkv\", \"budget\": 24, "
        "\"window\": 4, \"buffer\": 8}}",
        &engine));

    uint64_t ids[3];
    CHECK(kvsift_request_add(engine, "the quiet grey cat sat on the mat",
                             "{\"max_tokens\": 40, \"temperature\": 0}", &ids[0]));
    CHECK(kvsift_request_add(
        engine, "a long way down the river",
        "{\"max_tokens\": 24, \"kv\": {\"method\": \"snapkv\", \"budget\": 16}}",
        &ids[1]));
    CHECK(kvsift_request_add(engine, "once upon a time",
                             "{\"max_tokens\": 200}", &ids[2]));

    uint64_t bad_id = 0;
    EXPECT(kvsift_request_add(engine, "x", "{\"kv\": {\"budget\": 2}}", &bad_id) ==
           KVSIFT_INVALID_ARGUMENT);
    printf("expected error: %s\n", kvsift_last_error());
    EXPECT(strstr(kvsift_last_error(), "kv.budget") != NULL);
    EXPECT(kvsift_request_add(engine, "x", "{\"tempreature\": 1}", &bad_id) ==
           KVSIFT_INVALID_ARGUMENT);
    EXPECT(kvsift_request_cancel(engine, 12345) == KVSIFT_NOT_FOUND);

    char text[3][4096] = {{0}};
    int tokens[3] = {0, 0, 0};
    int finished = 0;
    bool has_work = true;
    while (has_work) {
        CHECK(kvsift_engine_step(engine, &has_work));
        KvsiftEvent ev;
        bool got = false;
        for (;;) {
            CHECK(kvsift_engine_poll(engine, &ev, &got));
            if (!got) break;
            int i = ev.request == ids[0] ? 0 : ev.request == ids[1] ? 1 : 2;
            EXPECT(ev.request == ids[i]);
            if (strlen(text[i]) + strlen(ev.text) < sizeof text[i])
                strcat(text[i], ev.text);
            if (ev.kind == KVSIFT_TOKEN) {
                tokens[i]++;
                if (i == 2 && tokens[i] == 5) {
                    CHECK(kvsift_request_cancel(engine, ids[2]));
                }
            } else if (ev.kind == KVSIFT_FINISHED) {
                finished++;
                printf("request %llu: %d tokens, %s; %llu KV slots kept, %llu "
                       "passes dropped %llu, peak %llu KV bytes\n  text: %s\n",
                       (unsigned long long)ev.request, tokens[i],
                       finish_name(ev.finish), (unsigned long long)ev.slots_kept,
                       (unsigned long long)ev.compression_passes,
                       (unsigned long long)ev.slots_dropped,
                       (unsigned long long)ev.peak_kv_bytes, text[i]);
                if (i == 0) {
                    EXPECT(ev.finish == KVSIFT_LENGTH || ev.finish == KVSIFT_STOP);
                    /* R-KV compressed it: 40 tokens past a budget of 24. */
                    if (ev.finish == KVSIFT_LENGTH)
                        EXPECT(ev.compression_passes > 0 && ev.slots_dropped > 0);
                }
                if (i == 2) EXPECT(ev.finish == KVSIFT_CANCELLED);
                EXPECT(ev.peak_kv_bytes > 0);
            } else if (ev.kind == KVSIFT_FAILED) {
                fprintf(stderr, "request %llu failed: %s\n",
                        (unsigned long long)ev.request, ev.text);
                return 1;
            }
        }
    }
    EXPECT(finished == 3);
    EXPECT(tokens[0] > 0 && tokens[1] > 0 && tokens[2] == 5);

    KvsiftStats stats;
    CHECK(kvsift_engine_stats(engine, &stats));
    printf("pool: %llu of %llu pages in use (peak %llu); %llu compression passes\n",
           (unsigned long long)stats.kv_pages_in_use,
           (unsigned long long)stats.kv_pages_total,
           (unsigned long long)stats.kv_pages_peak,
           (unsigned long long)stats.compression_passes);
    EXPECT(stats.kv_pages_in_use == 0 && stats.running == 0 && stats.waiting == 0);
    EXPECT(stats.kv_pages_peak > 0);

    kvsift_engine_free(engine);
    EXPECT(kvsift_engine_step(NULL, NULL) == KVSIFT_INVALID_ARGUMENT);
    printf("ok\n");
    return 0;
}
