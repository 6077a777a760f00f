/* Open-loop Redis load of N s2s sessions, for bench/redis_capacity.py (which compiles
 * it, prepares the data directory and reads the JSON line this prints).
 *
 * Why C: a Python client spends ~20-60 us of its own CPU per command, so on a small
 * machine it saturates long before Redis does and never finds Redis' limit.  This
 * sends the same commands with the same payloads (the project's encoded frames, made
 * by the Python side) on a fixed schedule, and drains the replies of the per-session
 * connections without parsing them; only the stage connection parses (it needs the
 * ids of the entries it acknowledges).
 *
 * Per session, two connections: "gw" (the gateway) and "wk" (its VAD owner).  Every
 * 20 ms tick:
 *   gw: XADD s2s:audio:{sid} MAXLEN ~ 2000 <id> f <Audio frame> + EXPIRE   (Bus.emit)
 *       and, when the session has new output, XREAD COUNT 200 s2s:out:{sid}
 *   wk: XREAD COUNT 50 STREAMS s2s:audio:{sid} <last id>      (the VAD's read)
 *       EVALSHA SAVE_IF_OWNER (position + state, fenced)       (a separate write)
 *       GET s2s:turn:{sid} at --turn-polls per second           (stale-turn checks)
 * every 0.5 s gw: EVALSHA _TOUCH (failover);  every 1 s gw: the admission refresh
 *   (ZADD live, ZADD psess, EXPIRE, EXPIRE);
 * every --utterance-every s: wk: EVALSHA EMIT_IF_OWNER SpeechStarted -> out, then the
 *   Utterance -> s2s:stt; gw: XTRIM s2s:out MINID (played output).
 * One "stage" connection per process plays STT, LLM and TTS each tick: XREADGROUP
 * COUNT 100 on s2s:stt / s2s:llm / s2s:tts, and per entry GET turn, the outputs
 * (Transcript -> s2s:llm + out, ReplyText x texts -> s2s:tts + out, ReplyAudio x chunks
 * -> out, each XADD + EXPIRE) and EVALSHA ACK_DEL.
 *
 * usage: redis_load HOST PORT DIR PROC   (DIR/params, DIR/sessions.PROC, DIR/NAME.bin) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct { char *p; size_t n, cap; } buf_t;
typedef struct { char *p; size_t n; } blob_t;

static void die(const char *m) { perror(m); exit(2); }

static void put(buf_t *b, const void *s, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 4096;
        b->p = realloc(b->p, b->cap);
        if (!b->p) die("realloc");
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

/* one RESP command from argv (lengths given: payloads are binary) */
static void cmd(buf_t *b, int argc, const char **argv, const size_t *lens) {
    char head[32];
    put(b, head, snprintf(head, sizeof head, "*%d\r\n", argc));
    for (int i = 0; i < argc; i++) {
        size_t n = lens ? lens[i] : strlen(argv[i]);
        put(b, head, snprintf(head, sizeof head, "$%zu\r\n", n));
        put(b, argv[i], n);
        put(b, "\r\n", 2);
    }
}

/* printf-style command of text words, with one binary word marked "%b" */
static void cmdf(buf_t *b, const blob_t *bin, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    const char *argv[32];
    size_t lens[32];
    int argc = 0;
    for (char *tok = strtok(line, " "); tok && argc < 32; tok = strtok(NULL, " ")) {
        if (!strcmp(tok, "%b") && bin) { argv[argc] = bin->p; lens[argc++] = bin->n; }
        else { argv[argc] = tok; lens[argc++] = strlen(tok); }
    }
    cmd(b, argc, argv, lens);
}

static blob_t slurp(const char *dir, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    fseek(f, 0, SEEK_END);
    blob_t b = {malloc(ftell(f) + 1), (size_t)ftell(f)};
    rewind(f);
    if (fread(b.p, 1, b.n, f) != b.n) die("fread");
    fclose(f);
    return b;
}

static int dial(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static long long writes_failed;
static void send_all(int fd, buf_t *b) {
    size_t off = 0;
    while (off < b->n) {
        ssize_t k = send(fd, b->p + off, b->n - off, MSG_NOSIGNAL);
        if (k < 0) { if (errno == EINTR) continue; writes_failed++; break; }
        off += k;
    }
    b->n = 0;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* --- the stage connection: a blocking reader that parses RESP --------------------- */
static int sfd;
static buf_t in;       /* unread reply bytes of the stage connection */
static size_t in_off;
static long pending;   /* replies not read yet on the stage connection */

static int fill(void) {
    char tmp[65536];
    ssize_t k = recv(sfd, tmp, sizeof tmp, 0);
    if (k <= 0) die("stage recv");
    put(&in, tmp, k);
    return 0;
}

static char *line_end(size_t at) {
    for (;;) {
        char *e = memmem(in.p + at, in.n - at, "\r\n", 2);
        if (e) return e;
        fill();
    }
}

/* parse one reply at in_off; bulk strings' offsets into `in` go to out (up to max:
   offsets, not pointers, since reading more may move the buffer), counted in *nout */
typedef struct { size_t off, n; } span_t;
static long long redis_errors;
static void parse(span_t *out, int max, int *nout) {
    size_t start = in_off;
    char *e = line_end(start);
    char type = in.p[start];
    long long v = strtoll(in.p + start + 1, NULL, 10);
    size_t body = (e - in.p) + 2;
    in_off = body;
    if (type == '*') {
        for (long long i = 0; i < v; i++) parse(out, max, nout);
    } else if (type == '$' && v >= 0) {
        while (in.n < body + v + 2) fill();
        if (out && *nout < max) { out[*nout].off = body; out[*nout].n = v; }
        (*nout)++;
        in_off = body + v + 2;
    } else if (type == '-') {
        if (redis_errors++ < 5)
            fprintf(stderr, "redis error: %.*s\n", (int)(body - 2 - start - 1), in.p + start + 1);
    }
}

static void drain_stage(void) {
    while (pending > 0) { int n = 0; parse(NULL, 0, &n); pending--; }
    if (in_off == in.n) in.n = in_off = 0;
}

/* --- sessions ---------------------------------------------------------------------- */
typedef struct {
    char sid[80], entry[48];
    int gw, wk;
    long long last_ms, last_seq;   /* last audio id written */
    int out_new;                   /* output written since the gateway's last read */
    double utt_at;                 /* next utterance */
} sess_t;

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s HOST PORT DIR PROC\n", argv[0]); return 2; }
    const char *host = argv[1], *dir = argv[3];
    int port = atoi(argv[2]), proc = atoi(argv[4]);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    /* params: start duration utterance_every texts chunks turn_polls consumer gwid
       sha_save sha_emit sha_ackdel sha_touch */
    char start_s[64], dur_s[64], utt_s[64], texts_s[16], chunks_s[16], polls_s[64];
    char consumer[64], gwid[64], sha_save[48], sha_emit[48], sha_ackdel[48], sha_touch[48];
    {
        char path[512];
        snprintf(path, sizeof path, "%s/params", dir);
        FILE *f = fopen(path, "r");
        if (!f || fscanf(f, "%63s %63s %63s %15s %15s %63s %63s %63s %47s %47s %47s %47s",
                         start_s, dur_s, utt_s, texts_s, chunks_s, polls_s, consumer, gwid,
                         sha_save, sha_emit, sha_ackdel, sha_touch) != 12) die("params");
        fclose(f);
    }
    double start = atof(start_s), duration = atof(dur_s), utt_every = atof(utt_s);
    int texts = atoi(texts_s), chunks = atoi(chunks_s);
    double polls = atof(polls_s);
    blob_t audio = slurp(dir, "audio.bin"), utt = slurp(dir, "utt.bin"),
           transcript = slurp(dir, "transcript.bin"), text = slurp(dir, "text.bin"),
           chunk = slurp(dir, "chunk.bin"), started = slurp(dir, "started.bin"),
           state = slurp(dir, "state.bin");

    char path[512];
    snprintf(path, sizeof path, "%s/sessions.%d", dir, proc);
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    int cap = 1024, n = 0;
    sess_t *S = calloc(cap, sizeof *S);
    while (n < cap && fscanf(f, "%79s %47s", S[n].sid, S[n].entry) == 2) {
        if (++n == cap) { cap *= 2; S = realloc(S, cap * sizeof *S); memset(S + n, 0, (cap - n) * sizeof *S); }
    }
    fclose(f);

    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        S[i].gw = dial(host, port);
        S[i].wk = dial(host, port);
        struct epoll_event e = {.events = EPOLLIN};
        e.data.fd = S[i].gw; epoll_ctl(ep, EPOLL_CTL_ADD, S[i].gw, &e);
        e.data.fd = S[i].wk; epoll_ctl(ep, EPOLL_CTL_ADD, S[i].wk, &e);
        S[i].utt_at = start + utt_every * ((i * 7919 + proc * 104729) % 1000) / 1000.0;
    }
    sfd = dial(host, port);

    buf_t b = {0}, sb = {0};
    const double tick = 0.02;
    long long ticks = 0, late = 0, cmds = 0, turns = 0, stage_items = 0;
    double worst_lag = 0;
    static char scratch[1 << 16];
    span_t got[400];
    const char *stage_stream[3] = {"s2s:stt", "s2s:llm", "s2s:tts"};
    const char *stage_group[3] = {"stt", "llm", "tts"};

    while (now_s() < start) usleep(1000);
    double stop = start + duration;
    for (long long k = 0;; k++) {
        double t0 = start + k * tick;
        if (t0 >= stop || now_s() >= stop) break;  /* behind: what was done is the count */
        /* sessions are spread over the tick: session i is due at t0 + i/n of a tick */
        for (int i = 0; i < n; i++) {
            sess_t *s = &S[i];
            double due = t0 + tick * i / n;
            /* until due: drain replies (never parsed on these connections), sleeping in
               epoll (whole ms), never spinning; when behind, drain every 32 sessions */
            for (int first = 1;; first = 0) {
                double wait = due - now_s();
                if (wait <= 0 && !(first && i % 32 == 0)) break;
                struct epoll_event evs[256];
                int m = epoll_wait(ep, evs, 256, wait > 0 ? (int)(wait * 1000) + 1 : 0);
                for (int j = 0; j < m; j++)
                    while (recv(evs[j].data.fd, scratch, sizeof scratch, MSG_DONTWAIT) == sizeof scratch) {}
                if (wait <= 0) break;
            }
            double lag = now_s() - due;
            if (lag > worst_lag) worst_lag = lag;
            if (lag > 0.1) late++;
            long long ms = (long long)(now_s() * 1000);
            if (ms <= s->last_ms) ms = s->last_ms;
            char id[48], prev[48];
            snprintf(prev, sizeof prev, "%lld-%lld", s->last_ms, s->last_seq);
            s->last_ms = ms; s->last_seq = k + 1;
            snprintf(id, sizeof id, "%lld-%lld", ms, k + 1);
            /* the gateway: audio in, and the output when there is new output */
            cmdf(&b, &audio, "XADD s2s:audio:{%s} MAXLEN ~ 2000 %s f %%b", s->sid, id);
            cmdf(&b, NULL, "EXPIRE s2s:audio:{%s} 3600", s->sid);
            cmds += 2;
            if (s->out_new) {
                cmdf(&b, NULL, "XREAD COUNT 200 STREAMS s2s:out:{%s} %lld-0", s->sid, ms - 200);
                s->out_new = 0;
                cmds++;
            }
            if (k % 25 == i % 25) {   /* failover touch, twice a second */
                cmdf(&b, NULL, "EVALSHA %s 2 s2s:gw:{%s} s2s:turn:{%s} %s 0 3600",
                     sha_touch, s->sid, s->sid, gwid);
                cmds++;
            }
            if (k % 50 == i % 50) {   /* admission refresh, once a second */
                char ts[32];
                snprintf(ts, sizeof ts, "%.3f", now_s());
                cmdf(&b, NULL, "ZADD s2s:live %s %s", ts, s->sid);
                cmdf(&b, NULL, "ZADD s2s:psess:bench %s %s", ts, s->sid);
                cmdf(&b, NULL, "EXPIRE s2s:psess:bench 3600");
                cmdf(&b, NULL, "EXPIRE s2s:owner:{%s} 3600", s->sid);
                cmds += 4;
            }
            int turn = now_s() >= s->utt_at;
            if (turn) {
                cmdf(&b, NULL, "XTRIM s2s:out:{%s} MINID ~ %lld-0", s->sid, ms - 8000);
                cmds++;
            }
            send_all(s->gw, &b);
            /* the VAD owner: read what came, then save the resume point (fenced) */
            cmdf(&b, NULL, "XREAD COUNT 50 STREAMS s2s:audio:{%s} %s", s->sid, prev);
            send_all(s->wk, &b);
            char pos[48];
            snprintf(pos, sizeof pos, "%s", id);
            cmdf(&b, &state, "EVALSHA %s 3 s2s:vad:sessions s2s:vadpos:{%s} s2s:vadstate:{%s} "
                 "vad %s %s %s %%b 3600", sha_save, s->sid, s->sid, consumer, s->entry, pos);
            cmds += 2;
            if ((long long)((k + 1) * tick * polls) > (long long)(k * tick * polls)) {
                cmdf(&b, NULL, "GET s2s:turn:{%s}", s->sid);
                cmds++;
            }
            if (turn) {  /* end of an utterance: speech started went out earlier; here both */
                cmdf(&b, &started, "EVALSHA %s 2 s2s:vad:sessions s2s:out:{%s} vad %s %s %%b 2000 3600",
                     sha_emit, s->sid, consumer, s->entry);
                /* the utterance carries its session's index in its first bytes (for the
                   stage connection); Redis sees the frame's real size */
                char tag[16];
                snprintf(tag, sizeof tag, "%08d", i);
                memcpy(utt.p, tag, 8);
                cmdf(&b, &utt, "EVALSHA %s 2 s2s:vad:sessions s2s:stt vad %s %s %%b 10000 0",
                     sha_emit, consumer, s->entry);
                cmds += 2;
                s->utt_at += utt_every;
                turns++;
            }
            send_all(s->wk, &b);
            ticks++;
        }
        /* the stages, once a tick: take what is queued, answer, acknowledge */
        for (int st = 0; st < 3; st++) {
            drain_stage();
            cmdf(&sb, NULL, "XREADGROUP GROUP %s %s-%d COUNT 100 STREAMS %s >",
                 stage_group[st], stage_group[st], proc, stage_stream[st]);
            send_all(sfd, &sb);
            cmds++;
            int nb = 0;
            parse(got, 400, &nb);
            if (nb > 400) nb = 400;
            /* bulk strings: stream, then per entry: id, "f", data */
            for (int e = 1; e + 2 < nb; e += 3) {
                char eid[48], tag8[9] = {0};
                snprintf(eid, sizeof eid, "%.*s", (int)got[e].n, in.p + got[e].off);
                memcpy(tag8, in.p + got[e + 2].off, got[e + 2].n >= 8 ? 8 : got[e + 2].n);
                int idx = atoi(tag8);
                if (idx < 0 || idx >= n) idx = 0;
                sess_t *s = &S[idx];
                char tag[16];
                snprintf(tag, sizeof tag, "%08d", idx);
                cmdf(&sb, NULL, "GET s2s:turn:{%s}", s->sid);
                pending++; cmds++;
                if (st == 0) {
                    memcpy(transcript.p, tag, 8);
                    cmdf(&sb, &transcript, "XADD s2s:llm MAXLEN ~ 10000 * f %%b");
                    cmdf(&sb, &transcript, "XADD s2s:out:{%s} MAXLEN ~ 2000 * f %%b", s->sid);
                    cmdf(&sb, NULL, "EXPIRE s2s:out:{%s} 3600", s->sid);
                    pending += 3; cmds += 3;
                } else if (st == 1) {
                    for (int x = 0; x < texts; x++) {
                        memcpy(text.p, tag, 8);
                        cmdf(&sb, &text, "XADD s2s:tts MAXLEN ~ 10000 * f %%b");
                        cmdf(&sb, &text, "XADD s2s:out:{%s} MAXLEN ~ 2000 * f %%b", s->sid);
                        cmdf(&sb, NULL, "EXPIRE s2s:out:{%s} 3600", s->sid);
                        pending += 3; cmds += 3;
                    }
                } else {
                    for (int x = 0; x < chunks; x++) {
                        cmdf(&sb, &chunk, "XADD s2s:out:{%s} MAXLEN ~ 2000 * f %%b", s->sid);
                        cmdf(&sb, NULL, "EXPIRE s2s:out:{%s} 3600", s->sid);
                        pending += 2; cmds += 2;
                    }
                }
                cmdf(&sb, NULL, "EVALSHA %s 1 %s %s %s", sha_ackdel, stage_stream[st],
                     stage_group[st], eid);
                pending++; cmds++;
                s->out_new = 1;
                stage_items++;
            }
            send_all(sfd, &sb);
        }
    }
    drain_stage();
    printf("{\"ticks\": %lld, \"late\": %lld, \"cmds\": %lld, \"turns\": %lld, "
           "\"stage_items\": %lld, \"worst_lag_s\": %.3f, \"write_errors\": %lld, \"sessions\": %d, "
           "\"redis_errors\": %lld}\n",
           ticks, late, cmds, turns, stage_items, worst_lag, writes_failed, n, redis_errors);
    return 0;
}
