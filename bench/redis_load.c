/* Open-loop Redis load of an s2s fleet serving N sessions, for bench/redis_capacity.py
 * (which compiles it, prepares the data directory and reads the JSON line it prints).
 * The command mix and its rates are bench/redis_mix.py's model of the control plane; the
 * Python side writes them into DIR/params.
 *
 * Why C: a Python client spends ~20-60 us of its own CPU per command, so on a small
 * machine it saturates long before Redis does and never finds Redis' limit.
 *
 * One process here plays a share of the fleet, each simulated process on connections of
 * its own, as the real ones hold them:
 *   gateway (one per --per-gateway sessions): GWCONNS pooled command connections and ONE
 *     output reader: a blocking XREAD COUNT 200 BLOCK 1000 over all its sessions' output
 *     streams, issued again as soon as it returns (positions tracked per stream);
 *   VAD worker (one per --per-vad): a command connection and ONE audio reader, a blocking
 *     XREAD COUNT 50 over its sessions' audio streams, issued again a gap after a read that
 *     found audio (s2s/bus_reader.py);
 *   STT, LLM and TTS workers (each one per --per-stage): a command connection, a reading
 *     connection (XREADGROUP BLOCK 500 COUNT <free slots>) and a pub/sub connection
 *     subscribed to s2s:turns (every turn change reaches every subscriber).
 * Per session, every 20 ms tick: the gateway's Audio XADD (one per client message: every
 * tick for 20 ms messages; its TTL a tenth of the session TTL apart); every SAVE ticks the VAD's fenced resume point (SAVE_IF_OWNER); per cycle
 * (the profile's window) its speech emits to the output and utterances to s2s:stt
 * (EMIT_IF_OWNER), turn changes (INCR_IF_OWNER: INCR, EXPIRE, PUBLISH), the gateway's trims
 * of played output and checks of the VAD's position.  Twice a second the gateway's
 * GATEWAY_TOUCH per session (EVAL, as the gateway sends it) and its heartbeat (ZADD, SADD
 * of all its sessions, EXPIRE); once a second its admission refresh (ZADD s2s:live of all
 * its sessions; per session ZADD psess, EXPIRE x2) and stage check; every 5 s MEMORY USAGE
 * of each session key.  Workers: heartbeat script and live check 4/s, XAUTOCLAIM every
 * 1.5 s, the keep-alive script over what they hold twice a second (a VAD worker: all its
 * sessions), turn checks (MGET) once a second while they hold work.  Stage items are held
 * as long as the model says, then answered (each output XADD + EXPIRE) and ACK_DEL'd.
 *
 * Session ids are p<PROC>s<INDEX> padded to 22 characters (a gateway's token_urlsafe(16)),
 * so a frame's first bytes (a tag "PPIIIIIIIIKK": proc, session index, turn item) tell a
 * stage worker whose it is, whichever load process wrote it.
 *
 * usage: redis_load HOST PORT DIR PROC   (DIR/params, DIR/entries.PROC, DIR/NAME.bin) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
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

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* --- connections: commands out, replies parsed as they come ------------------------ */
enum { DRAIN, AUDIO_READER, OUT_READER, STAGE_READER, PUBSUB };
typedef struct conn {
    int fd, kind;
    void *owner;
    buf_t out, in;
    size_t in_off;
} conn_t;

static long long writes_failed, redis_errors, replies, pubsub_msgs;

static conn_t *dial(const char *host, int port, int ep, int kind, void *owner) {
    conn_t *c = calloc(1, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a)) die("connect");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->kind = kind;
    c->owner = owner;
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
    return c;
}

static void flush(conn_t *c) {
    size_t off = 0;
    while (off < c->out.n) {
        ssize_t k = send(c->fd, c->out.p + off, c->out.n - off, MSG_NOSIGNAL);
        if (k < 0) { if (errno == EINTR) continue; writes_failed++; break; }
        off += k;
    }
    c->out.n = 0;
}

/* one RESP command: words of text and, for "%b", the binary blob */
static void cmdv(conn_t *c, const blob_t *bin, const char *fmt, va_list ap) {
    char line[2048];
    vsnprintf(line, sizeof line, fmt, ap);
    const char *argv[64];
    size_t lens[64];
    int argc = 0;
    for (char *tok = strtok(line, " "); tok && argc < 64; tok = strtok(NULL, " ")) {
        if (!strcmp(tok, "%b") && bin) { argv[argc] = bin->p; lens[argc++] = bin->n; }
        else { argv[argc] = tok; lens[argc++] = strlen(tok); }
    }
    char head[32];
    put(&c->out, head, snprintf(head, sizeof head, "*%d\r\n", argc));
    for (int i = 0; i < argc; i++) {
        put(&c->out, head, snprintf(head, sizeof head, "$%zu\r\n", lens[i]));
        put(&c->out, argv[i], lens[i]);
        put(&c->out, "\r\n", 2);
    }
}

static long long cmds;
static void cmd(conn_t *c, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt); cmdv(c, NULL, fmt, ap); va_end(ap); cmds++;
}
static void cmdb(conn_t *c, const blob_t *bin, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt); cmdv(c, bin, fmt, ap); va_end(ap); cmds++;
}

/* a command of many words, built word by word (the multiplexed XREADs, SADD, ZADD) */
static void words_begin(conn_t *c, int argc) {
    char head[32];
    put(&c->out, head, snprintf(head, sizeof head, "*%d\r\n", argc));
    cmds++;
}
static void word(conn_t *c, const char *s) {
    char head[32];
    size_t n = strlen(s);
    put(&c->out, head, snprintf(head, sizeof head, "$%zu\r\n", n));
    put(&c->out, s, n);
    put(&c->out, "\r\n", 2);
}

/* Length of the complete reply at p (of n bytes), or 0 if it has not all arrived. */
static size_t reply_len(const char *p, size_t n) {
    const char *e = memmem(p, n, "\r\n", 2);
    if (!e) return 0;
    size_t head = (e - p) + 2;
    long long v = strtoll(p + 1, NULL, 10);
    if (p[0] == '$') {
        if (v < 0) return head;
        return n >= head + v + 2 ? head + v + 2 : 0;
    }
    if (p[0] == '*') {
        size_t at = head;
        for (long long i = 0; i < v; i++) {
            size_t k = reply_len(p + at, n - at);
            if (!k) return 0;
            at += k;
        }
        return at;
    }
    return head;
}

/* walking a complete reply: the next element's type, integer/count, and bulk bytes */
typedef struct { const char *p; size_t at; } walk_t;
static char next(walk_t *w, long long *v, const char **s) {
    const char *q = w->p + w->at;
    const char *e = strstr(q, "\r\n");
    char t = q[0];
    *v = strtoll(q + 1, NULL, 10);
    w->at += (e - q) + 2;
    if (t == '$' && *v >= 0) { *s = w->p + w->at; w->at += *v + 2; }
    return t;
}
static void skip(walk_t *w) {
    long long v; const char *s;
    if (next(w, &v, &s) == '*') for (long long i = 0; i < v; i++) skip(w);
}

/* --- the fleet ---------------------------------------------------------------------- */
typedef struct { char last[48]; } pos_t;
typedef struct reader {
    conn_t *c;
    const char *prefix;           /* "s2s:audio:" or "s2s:out:" */
    int first, n;                 /* its sessions: first .. first+n-1 of this process */
    pos_t *pos;
    int count, block_ms, busy;
    double gap_s, next_at;
    long long reads, entries;
} reader_t;

typedef struct { char eid[48]; int proc, idx, item; double done_at; } held_t;
typedef struct worker {
    int stage;                    /* 0 stt, 1 llm, 2 tts, 3 vad */
    char name[48];
    conn_t *c, *rd, *sub;
    held_t *held;
    int nheld, slots, reading;
    double next_beat, next_claim, next_keep, next_check;
    reader_t *audio;              /* a VAD worker's */
    long long items;
} worker_t;

typedef struct {
    char sid[32], entry[48];      /* its entry in s2s:vad:sessions, owned by its VAD */
    int gw, vad;
    long long phase;              /* spreads the sessions' cycles and periodic writes */
} sess_t;

static const char *STREAM[4] = {"s2s:stt", "s2s:llm", "s2s:tts", "s2s:vad:sessions"};
static const char *GROUP[4] = {"stt", "llm", "tts", "vad"};

/* params (DIR/params: "name value" lines) */
static double P_start, P_duration, P_cycle, P_gap, P_own, P_hold[3];
static int P_save, P_utt, P_emits, P_trans, P_texts, P_chunks, P_trims, P_vadpos, P_ttl_ticks,
    P_touch_ticks, P_register_ticks, P_bytes_ticks, P_gwconns, P_slots, P_keys, P_audio_ticks = 1;
static double P_beat, P_claim, P_keep, P_check, P_keda;
static char SHA_SAVE[128], SHA_EMIT[128], SHA_ACKDEL[128], SHA_KEEP[128], SHA_INCR[128],
    SHA_BEAT[128];
static blob_t audio, utt, transcript, text, chunk, started, state, touch_src;
static int PROC;

static void sid_of(char *out, int proc, int idx) {
    char s[32];
    snprintf(s, sizeof s, "p%ds%05d", proc, idx);
    snprintf(out, 32, "%-22s", s);
    for (char *q = out; *q; q++) if (*q == ' ') *q = 'x';
}

static void tag(blob_t *b, int proc, int idx, int item) {
    char t[24];
    snprintf(t, sizeof t, "%02d%08d%02d", proc % 100, idx % 100000000, item % 100);
    memcpy(b->p, t, 12);
}

static sess_t *S;
static int NS;

static void reader_issue(reader_t *r) {
    words_begin(r->c, 6 + 2 * r->n);
    char num[32];
    word(r->c, "XREAD"); word(r->c, "COUNT");
    snprintf(num, sizeof num, "%d", r->count); word(r->c, num);
    word(r->c, "BLOCK");
    snprintf(num, sizeof num, "%d", r->block_ms); word(r->c, num);
    word(r->c, "STREAMS");
    char key[64];
    for (int i = 0; i < r->n; i++) {
        snprintf(key, sizeof key, "%s{%s}", r->prefix, S[r->first + i].sid);
        word(r->c, key);
    }
    for (int i = 0; i < r->n; i++) word(r->c, r->pos[i].last);
    flush(r->c);
    r->busy = 1;
    r->reads++;
}

/* an XREAD reply: [[key, [[id, [f, data]], ...]], ...] or a null (timed out) */
static void reader_reply(reader_t *r, walk_t *w, double now) {
    long long v, nstreams; const char *s;
    r->busy = 0;
    r->next_at = now;
    if (next(w, &nstreams, &s) != '*' || nstreams < 0) return;
    for (long long k = 0; k < nstreams; k++) {
        next(w, &v, &s);            /* [key, entries] */
        next(w, &v, &s);            /* key */
        int proc, idx;
        const char *brace = memchr(s, '{', v);
        if (!brace || sscanf(brace + 1, "p%ds%d", &proc, &idx) != 2) idx = -1;
        long long nent;
        next(w, &nent, &s);
        for (long long e = 0; e < nent; e++) {
            long long two, idn; const char *id;
            next(w, &two, &s);
            next(w, &idn, &id);
            int i = idx - r->first;
            if (i >= 0 && i < r->n && idn < 47) { memcpy(r->pos[i].last, id, idn); r->pos[i].last[idn] = 0; }
            skip(w);                /* fields */
            r->entries++;
        }
    }
    if (nstreams > 0) r->next_at = now + r->gap_s;
}

static void worker_read(worker_t *w) {
    char consumer[64];
    snprintf(consumer, sizeof consumer, "%s", w->name);
    cmd(w->rd, "XREADGROUP GROUP %s %s COUNT %d BLOCK 500 STREAMS %s >", GROUP[w->stage],
        consumer, w->slots - w->nheld, STREAM[w->stage]);
    flush(w->rd);
    w->reading = 1;
}

/* a stage item starts: what the stage reads first */
static void item_start(worker_t *w, held_t *h) {
    char sid[32];
    sid_of(sid, h->proc, h->idx);
    cmd(w->c, "GET s2s:turn:{%s}", sid);
    if (w->stage == 0) cmd(w->c, "GET s2s:stage:{%s}:stt", sid);
    if (w->stage == 1) { cmd(w->c, "GET s2s:ctx:{%s}", sid); cmd(w->c, "HGETALL s2s:prefs:{%s}", sid); }
    flush(w->c);
}

/* ... and ends: its outputs (to the next stage and the session's output), then ACK_DEL */
static void item_done(worker_t *w, held_t *h) {
    char sid[32];
    sid_of(sid, h->proc, h->idx);
    int tpi = P_texts / (P_trans ? P_trans : 1), cpt = P_chunks / (P_texts ? P_texts : 1);
    if (w->stage == 0) {
        cmd(w->c, "SET s2s:stage:{%s}:stt 1234567 EX 3600", sid);
        if (h->item < P_trans) {
            tag(&transcript, h->proc, h->idx, h->item);
            cmdb(w->c, &transcript, "XADD s2s:llm MAXLEN ~ 10000 * f %%b");
            cmdb(w->c, &transcript, "XADD s2s:out:{%s} MAXLEN ~ 2000 * f %%b", sid);
            cmd(w->c, "EXPIRE s2s:out:{%s} 3600", sid);
        }
    } else if (w->stage == 1) {
        cmdb(w->c, &state, "SET s2s:ctx:{%s} %%b EX 3600", sid);
        cmdb(w->c, &state, "SET s2s:ctx:{%s} %%b EX 3600", sid);
        for (int x = 0; x < tpi; x++) {
            tag(&text, h->proc, h->idx, h->item);
            cmdb(w->c, &text, "XADD s2s:tts MAXLEN ~ 10000 * f %%b");
            cmdb(w->c, &text, "XADD s2s:out:{%s} MAXLEN ~ 2000 * f %%b", sid);
            cmd(w->c, "EXPIRE s2s:out:{%s} 3600", sid);
        }
    } else {
        for (int x = 0; x < cpt; x++) {
            cmdb(w->c, &chunk, "XADD s2s:out:{%s} MAXLEN ~ 2000 * f %%b", sid);
            cmd(w->c, "EXPIRE s2s:out:{%s} 3600", sid);
        }
    }
    cmd(w->c, "EVALSHA %s 1 %s %s %s", SHA_ACKDEL, STREAM[w->stage], GROUP[w->stage], h->eid);
    flush(w->c);
    w->items++;
}

/* an XREADGROUP reply: [[stream, [[id, [f, data]], ...]]] or a null */
static void worker_reply(worker_t *w, walk_t *wk, double now) {
    long long v, ns; const char *s;
    w->reading = 0;
    if (next(wk, &ns, &s) != '*' || ns < 0) return;
    for (long long k = 0; k < ns; k++) {
        next(wk, &v, &s); next(wk, &v, &s);     /* [stream, entries], stream */
        long long nent;
        next(wk, &nent, &s);
        for (long long e = 0; e < nent; e++) {
            long long idn, nf, dn; const char *id, *data = NULL;
            next(wk, &v, &s); next(wk, &idn, &id);
            next(wk, &nf, &s);
            for (long long f = 0; f < nf; f++) { next(wk, &dn, &s); if (f == 1) data = s; }
            if (w->nheld >= w->slots || idn > 47) continue;
            held_t *h = &w->held[w->nheld++];
            memcpy(h->eid, id, idn); h->eid[idn] = 0;
            char t[16] = {0};
            if (data && dn >= 12) memcpy(t, data, 12);
            h->item = atoi(t + 10); t[10] = 0;
            h->idx = atoi(t + 2); t[2] = 0;
            h->proc = atoi(t);
            h->done_at = now + P_hold[w->stage];
            item_start(w, h);
        }
    }
}

static void on_readable(conn_t *c, double now) {
    char tmp[1 << 16];
    for (;;) {
        ssize_t k = recv(c->fd, tmp, sizeof tmp, MSG_DONTWAIT);
        if (k > 0) { put(&c->in, tmp, k); if (k == sizeof tmp) continue; }
        else if (k == 0) die("redis closed a connection");
        break;
    }
    for (;;) {
        size_t n = reply_len(c->in.p + c->in_off, c->in.n - c->in_off);
        if (!n) break;
        walk_t w = {c->in.p + c->in_off, 0};
        char t = c->in.p[c->in_off];
        if (t == '-') {
            if (redis_errors++ < 5)
                fprintf(stderr, "redis error: %.*s\n", (int)n - 2, c->in.p + c->in_off);
        } else if (c->kind == AUDIO_READER || c->kind == OUT_READER) {
            reader_reply(c->owner, &w, now);
        } else if (c->kind == STAGE_READER) {
            worker_reply(c->owner, &w, now);
        } else if (c->kind == PUBSUB) {
            pubsub_msgs++;
        }
        replies++;
        c->in_off += n;
    }
    if (c->in_off == c->in.n) c->in.n = c->in_off = 0;
    else if (c->in_off > (1 << 20)) {
        memmove(c->in.p, c->in.p + c->in_off, c->in.n - c->in_off);
        c->in.n -= c->in_off; c->in_off = 0;
    }
}

/* the workers' and readers' clocks: reads to issue again, items done, keep-alives */
static worker_t *W;
static int NW;
static reader_t *R;
static int NR;

static void timers(double now) {
    for (int i = 0; i < NR; i++)
        if (!R[i].busy && now >= R[i].next_at) reader_issue(&R[i]);
    for (int i = 0; i < NW; i++) {
        worker_t *w = &W[i];
        if (w->stage < 3) {
            for (int j = 0; j < w->nheld; j++)
                if (now >= w->held[j].done_at) {
                    item_done(w, &w->held[j]);
                    w->held[j--] = w->held[--w->nheld];
                }
            if (!w->reading && w->nheld < w->slots) worker_read(w);
        }
        int dirty = 0;
        if (now >= w->next_beat) {
            w->next_beat += 1 / P_beat;
            cmd(w->c, "EVALSHA %s 1 s2s:workers %.3f %s|%s|http://10.0.0.1:9100", SHA_BEAT,
                now, GROUP[w->stage], w->name);
            cmd(w->c, "ZRANGEBYSCORE s2s:workers %.3f +inf WITHSCORES", now - 5);
            dirty = 1;
        }
        if (now >= w->next_claim) {
            w->next_claim += P_claim;
            /* (an idle time no entry reaches here: the load's owners never change) */
            cmd(w->c, "XAUTOCLAIM %s %s %s 600000 0-0 COUNT 8", STREAM[w->stage],
                GROUP[w->stage], w->name);
            dirty = 1;
        }
        if (now >= w->next_keep) {  /* the keep-alive over what it holds */
            w->next_keep += 1 / P_keep;
            int first = 0, n = w->nheld;
            if (w->stage == 3) {
                /* the VAD's read of new sessions (its blocking read times out twice a second) */
                cmd(w->c, "XREADGROUP GROUP vad %s COUNT 1 STREAMS s2s:vad:sessions >", w->name);
                dirty = 1;
                first = w->audio->first;
                n = w->audio->n;
            }
            if (n) {
                words_begin(w->c, 7 + n);
                word(w->c, "EVALSHA"); word(w->c, SHA_KEEP); word(w->c, "1");
                word(w->c, STREAM[w->stage]); word(w->c, GROUP[w->stage]); word(w->c, w->name);
                word(w->c, "0");
                for (int j = 0; j < n; j++)
                    word(w->c, w->stage == 3 ? S[first + j].entry : w->held[j].eid);
                dirty = 1;
            }
        }
        if (w->stage < 3 && now >= w->next_check) {  /* turn checks of work in flight */
            w->next_check += 1 / P_check;
            if (w->nheld) {
                words_begin(w->c, 1 + w->nheld);
                word(w->c, "MGET");
                char key[64], sid[32];
                for (int j = 0; j < w->nheld; j++) {
                    sid_of(sid, w->held[j].proc, w->held[j].idx);
                    snprintf(key, sizeof key, "s2s:turn:{%s}", sid);
                    word(w->c, key);
                }
                dirty = 1;
            }
        }
        if (dirty) flush(w->c);
    }
}

static int EP;
/* serve replies and clocks until `until` (wall time), sleeping in epoll, never spinning */
static void pump(double until) {
    struct epoll_event evs[256];
    for (int first = 1;; first = 0) {
        double now = now_s();
        timers(now);
        double wait = until - now;
        if (wait <= 0 && !first) break;
        int m = epoll_wait(EP, evs, 256, wait > 0 ? (int)(wait * 1000) + 1 : 0);
        now = now_s();
        for (int j = 0; j < m; j++) on_readable(evs[j].data.ptr, now);
        if (wait <= 0) break;
    }
}

/* does an event of `count` a cycle fire at position `pos` of a cycle of T ticks? */
static int fires(long long pos, int count, long long T) {
    if (count <= 0) return 0;
    if (pos == 0) return 1;
    return (pos * count) / T != ((pos - 1) * count) / T;
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
    b.p[b.n] = 0;
    fclose(f);
    return b;
}

static void params(const char *dir) {
    char path[512], k[64], v[128];
    snprintf(path, sizeof path, "%s/params", dir);
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    while (fscanf(f, "%63s %127s", k, v) == 2) {
#define D(name, var) if (!strcmp(k, name)) var = atof(v);
#define I(name, var) if (!strcmp(k, name)) var = atoi(v);
#define T(name, var) if (!strcmp(k, name)) snprintf(var, sizeof var, "%s", v);
        D("start", P_start) D("duration", P_duration) D("cycle_s", P_cycle) D("audio_gap_s", P_gap)
        D("reader_own_s", P_own) D("hold_stt", P_hold[0]) D("hold_llm", P_hold[1])
        D("hold_tts", P_hold[2]) D("heartbeat_per_s", P_beat) D("claim_every_s", P_claim)
        D("keepalive_per_s", P_keep) D("turn_check_per_s", P_check) D("keda_every_s", P_keda)
        I("save_every_frames", P_save) I("utterances", P_utt) I("speech_emits", P_emits)
        I("transcripts", P_trans) I("texts", P_texts) I("chunks", P_chunks) I("trims", P_trims)
        I("vadpos_checks", P_vadpos) I("audio_ttl_ticks", P_ttl_ticks)
        I("touch_ticks", P_touch_ticks) I("register_ticks", P_register_ticks)
        I("bytes_ticks", P_bytes_ticks) I("gw_conns", P_gwconns) I("slots", P_slots)
        I("session_keys", P_keys) I("audio_ticks", P_audio_ticks)
        T("sha_save", SHA_SAVE) T("sha_emit", SHA_EMIT) T("sha_ackdel", SHA_ACKDEL)
        T("sha_keep", SHA_KEEP) T("sha_incr", SHA_INCR) T("sha_beat", SHA_BEAT)
    }
    fclose(f);
#undef D
#undef I
#undef T
}

typedef struct { conn_t **c; reader_t *out; int first, n; } gw_t;

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s HOST PORT DIR PROC\n", argv[0]); return 2; }
    const char *host = argv[1], *dir = argv[3];
    int port = atoi(argv[2]);
    PROC = atoi(argv[4]);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    params(dir);
    audio = slurp(dir, "audio.bin"); utt = slurp(dir, "utt.bin");
    transcript = slurp(dir, "transcript.bin"); text = slurp(dir, "text.bin");
    chunk = slurp(dir, "chunk.bin"); started = slurp(dir, "started.bin");
    state = slurp(dir, "state.bin"); touch_src = slurp(dir, "touch.lua");

    /* DIR/fleet.PROC: "gateways G vads V stage S"; DIR/entries.PROC: per session
       "index gateway vad entry-id" (its session entry, pending on its VAD's consumer) */
    char path[512];
    int G, V, SW;
    snprintf(path, sizeof path, "%s/fleet.%d", dir, PROC);
    FILE *f = fopen(path, "r");
    if (!f || fscanf(f, "gateways %d vads %d stage %d", &G, &V, &SW) != 3) die("fleet");
    fclose(f);
    snprintf(path, sizeof path, "%s/entries.%d", dir, PROC);
    f = fopen(path, "r");
    if (!f) die(path);
    int cap = 1024;
    S = calloc(cap, sizeof *S);
    int idx;
    while (fscanf(f, "%d %d %d %47s", &idx, &S[NS].gw, &S[NS].vad, S[NS].entry) == 4) {
        sid_of(S[NS].sid, PROC, NS);
        S[NS].phase = ((long long)NS * 7919 + PROC * 104729) % 1000003;
        if (++NS == cap) { cap *= 2; S = realloc(S, cap * sizeof *S); }
    }
    fclose(f);

    EP = epoll_create1(0);
    NR = G + V;
    R = calloc(NR, sizeof *R);
    gw_t *GW = calloc(G, sizeof *GW);
    for (int g = 0; g < G; g++) {
        GW[g].c = calloc(P_gwconns, sizeof(conn_t *));
        for (int k = 0; k < P_gwconns; k++) GW[g].c[k] = dial(host, port, EP, DRAIN, NULL);
        GW[g].first = -1;
    }
    for (int s = 0; s < NS; s++) {
        gw_t *g = &GW[S[s].gw];
        if (g->first < 0) g->first = s;
        g->n++;
    }
    NW = V + 3 * SW;
    W = calloc(NW, sizeof *W);
    for (int i = 0; i < NW; i++) {
        worker_t *w = &W[i];
        w->stage = i < V ? 3 : (i - V) / (SW ? SW : 1);
        snprintf(w->name, sizeof w->name, "%s-p%d-w%d", GROUP[w->stage], PROC, i);
        w->c = dial(host, port, EP, DRAIN, w);
        double spread = (double)i / NW;
        w->next_beat = P_start + spread / P_beat;
        w->next_claim = P_start + spread * P_claim;
        w->next_keep = P_start + spread / P_keep;
        w->next_check = P_start + spread / P_check;
        w->slots = P_slots;
        if (w->stage < 3) {
            w->rd = dial(host, port, EP, STAGE_READER, w);
            w->sub = dial(host, port, EP, PUBSUB, w);
            w->held = calloc(P_slots, sizeof *w->held);
            cmd(w->sub, "SUBSCRIBE s2s:turns");
            flush(w->sub);
        }
    }
    /* the readers: each gateway's output, each VAD worker's audio */
    for (int i = 0; i < NR; i++) {
        reader_t *r = &R[i];
        int is_gw = i < G;
        int first = -1, n = 0;
        for (int s = 0; s < NS; s++)
            if ((is_gw ? S[s].gw : S[s].vad) == (is_gw ? i : i - G)) { if (first < 0) first = s; n++; }
        r->first = first < 0 ? 0 : first;
        r->n = n;
        r->prefix = is_gw ? "s2s:out:" : "s2s:audio:";
        r->count = is_gw ? 200 : 50;
        r->block_ms = is_gw ? 1000 : 500;
        r->gap_s = is_gw ? P_own : P_gap + P_own;
        r->pos = calloc(n ? n : 1, sizeof *r->pos);
        for (int k = 0; k < n; k++) strcpy(r->pos[k].last, "0-0");
        r->c = dial(host, port, EP, is_gw ? OUT_READER : AUDIO_READER, r);
        r->next_at = P_start;
        if (n == 0) r->busy = 1;   /* nothing to read: never issued */
        if (!is_gw) W[i - G].audio = r;
    }
    /* sessions are assigned to readers in contiguous ranges (the Python side's order) */

    const double tick = 0.02;
    long long ticks = 0, late = 0, turns = 0;
    double worst_lag = 0;
    long long T = (long long)llround(P_cycle / tick);
    pump(P_start);
    double stop = P_start + P_duration;
    double next_keda = P_start;
    char key[64];
    for (long long k = 0;; k++) {
        double t0 = P_start + k * tick;
        if (t0 >= stop || now_s() >= stop) break;  /* behind: what was done is the count */
        /* the gateways' per-gateway work, each at its own phase of the second */
        for (int g = 0; g < G; g++) {
            gw_t *gw = &GW[g];
            conn_t *c = gw->c[0];
            long long gp = k + g * 7;
            if (gp % P_touch_ticks == 0 && gw->n) {  /* failover: heartbeat, then every touch */
                cmd(c, "ZADD s2s:gateways %.3f gw-p%d-%d", now_s() + 2.0, PROC, g);
                words_begin(c, 2 + gw->n);
                word(c, "SADD");
                snprintf(key, sizeof key, "s2s:gwsessions:gw-p%d-%d", PROC, g);
                word(c, key);
                for (int s = gw->first; s < gw->first + gw->n; s++) word(c, S[s].sid);
                cmd(c, "EXPIRE s2s:gwsessions:gw-p%d-%d 3600", PROC, g);
                flush(c);
                for (int s = gw->first; s < gw->first + gw->n; s++) {
                    conn_t *cc = gw->c[s % P_gwconns];
                    cmdb(cc, &touch_src, "EVAL %%b 2 s2s:gw:{%s} s2s:turn:{%s} gw-p%d-%d 0 3600",
                         S[s].sid, S[s].sid, PROC, g);
                }
                for (int x = 0; x < P_gwconns; x++) flush(gw->c[x]);
            }
            if (gp % P_register_ticks == 3) {  /* admission: refresh, then register */
                char ts[32];
                snprintf(ts, sizeof ts, "%.3f", now_s());
                cmd(c, "ZCOUNT s2s:live %.3f +inf", now_s() - 30);
                for (int st = 0; st < 3; st++) {
                    cmd(c, "XINFO GROUPS %s", STREAM[st]);
                    cmd(c, "XRANGE %s - + COUNT 1", STREAM[st]);
                }
                cmd(c, "ZRANGEBYSCORE s2s:gateways -inf %.3f", now_s() - 1);
                if (gw->n) {
                    words_begin(c, 2 + 2 * gw->n);
                    word(c, "ZADD"); word(c, "s2s:live");
                    for (int s = gw->first; s < gw->first + gw->n; s++) { word(c, ts); word(c, S[s].sid); }
                    for (int s = gw->first; s < gw->first + gw->n; s++) {
                        cmd(c, "ZADD s2s:psess:key:bench %s %s", ts, S[s].sid);
                        cmd(c, "EXPIRE s2s:psess:key:bench 3600");
                        cmd(c, "EXPIRE s2s:owner:{%s} 3600", S[s].sid);
                    }
                }
                flush(c);
            }
        }
        if (PROC == 0 && t0 >= next_keda) {  /* KEDA's scalers: XLEN per stage stream */
            next_keda += P_keda;
            for (int st = 0; st < 4 && G; st++) cmd(GW[0].c[0], "XLEN %s", STREAM[st]);
            if (G) flush(GW[0].c[0]);
        }
        /* the sessions, spread over the tick: session i is due at t0 + i/n of a tick (sent
           up to 2 ms early) */
        for (int i = 0; i < NS; i++) {
            sess_t *s = &S[i];
            double due = t0 + tick * i / NS;
            /* sleep only for a slice of 2 ms or more: on a busy machine each wake-up waits
               for a time slice, and one per session would leave the schedule behind */
            double ahead = due - now_s();
            if (ahead > 0.002 || i % 32 == 0) pump(ahead > 0.002 ? due : 0);
            double lag = now_s() - due;
            if (lag > worst_lag) worst_lag = lag;
            if (lag > 0.1) late++;
            long long pos = (k + s->phase) % T;
            conn_t *gc = GW[s->gw].c[i % P_gwconns];
            conn_t *vc = W[s->vad].c;
            /* the gateway: the audio frame, its TTL now and then; trims and VAD checks */
            if ((k + s->phase) % P_audio_ticks == 0)  /* a client message: 20 ms or longer */
                cmdb(gc, &audio, "XADD s2s:audio:{%s} MAXLEN ~ 2000 * f %%b", s->sid);
            if ((k + s->phase) % P_ttl_ticks == 0 || k == 0)
                cmd(gc, "EXPIRE s2s:audio:{%s} 3600", s->sid);
            if (fires(pos, P_trims, T))
                cmd(gc, "XTRIM s2s:out:{%s} MINID %lld-0", s->sid, (long long)(now_s() * 1000) - 8000);
            if (fires((pos + T / 3) % T, P_vadpos, T)) cmd(gc, "GET s2s:vadpos:{%s}", s->sid);
            if ((k + s->phase) % P_bytes_ticks == 0) {
                /* MEMORY USAGE of each session key (admission: one session after the other,
                   so spread rather than one burst per gateway) */
                static const char *KEYS[] = {"s2s:audio:{%s}", "s2s:out:{%s}", "s2s:turn:{%s}",
                    "s2s:ctx:{%s}", "s2s:vadpos:{%s}", "s2s:vadstate:{%s}", "s2s:owner:{%s}",
                    "s2s:prefs:{%s}", "s2s:gw:{%s}"};
                for (int x = 0; x < P_keys && x < 9; x++) {
                    snprintf(key, sizeof key, KEYS[x], s->sid);
                    cmd(gc, "MEMORY USAGE %s", key);
                }
            }
            flush(gc);
            /* its VAD owner: the resume point; speech emits, utterances, turn changes */
            int dirty = 0;
            if ((k + s->phase) % P_save == 0) {
                cmdb(vc, &state, "EVALSHA %s 3 s2s:vad:sessions s2s:vadpos:{%s} s2s:vadstate:{%s} "
                     "vad %s %s %lld-0 %%b 3600", SHA_SAVE, s->sid, s->sid, W[s->vad].name, s->entry,
                     (long long)(now_s() * 1000));
                dirty = 1;
            }
            if (fires((pos + T / 2) % T, P_emits, T)) {
                cmdb(vc, &started, "EVALSHA %s 2 s2s:vad:sessions s2s:out:{%s} vad %s %s %%b 2000 3600",
                     SHA_EMIT, s->sid, W[s->vad].name, s->entry);
                dirty = 1;
            }
            if (fires(pos, P_utt, T)) {
                int item = (int)((pos * P_utt) / T);
                cmd(vc, "EVALSHA %s 2 s2s:vad:sessions s2s:turn:{%s} vad %s %s 3600 s2s:turns %s",
                    SHA_INCR, s->sid, W[s->vad].name, s->entry, s->sid);
                tag(&utt, PROC, i, item);
                cmdb(vc, &utt, "EVALSHA %s 2 s2s:vad:sessions s2s:stt vad %s %s %%b 10000 0",
                     SHA_EMIT, W[s->vad].name, s->entry);
                turns++;
                dirty = 1;
            }
            if (dirty) flush(vc);
            ticks++;
        }
    }
    pump(now_s() + 0.05);
    long long reads[2] = {0, 0}, entries[2] = {0, 0}, items = 0;
    for (int i = 0; i < NR; i++) { reads[i >= G] += R[i].reads; entries[i >= G] += R[i].entries; }
    for (int i = 0; i < NW; i++) items += W[i].items;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("{\"cpu_s\": %.3f, \"ticks\": %lld, \"late\": %lld, \"cmds\": %lld, \"turns\": %lld, "
           "\"stage_items\": %lld, \"worst_lag_s\": %.3f, \"write_errors\": %lld, \"sessions\": %d, "
           "\"redis_errors\": %lld, \"gateways\": %d, \"vad_workers\": %d, \"stage_workers\": %d, "
           "\"out_reads\": %lld, \"out_entries\": %lld, \"audio_reads\": %lld, "
           "\"audio_entries\": %lld, \"pubsub_messages\": %lld}\n",
           cpu, ticks, late, cmds, turns, items, worst_lag, writes_failed, NS, redis_errors, G, V, SW,
           reads[0], entries[0], reads[1], entries[1], pubsub_msgs);
    return 0;
}
