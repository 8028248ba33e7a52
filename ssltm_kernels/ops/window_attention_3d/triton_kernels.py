"""The window attention's Triton kernels (jitted code only): the block layout the kernels and their
launchers share, token addressing (padding, shift, partition, crop as address arithmetic), base-2 scores,
the forward and the backward passes A, A2, B and C. The launchers are in ``launch.py``."""

from __future__ import annotations

from ssltm_kernels._backend import HAS_TRITON
from ssltm_kernels.ops.window_attention_3d.reference import LOG2E, SHIFT_MASK_VALUE

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------------------------------
# Triton block layout: 16-granular tails
# --------------------------------------------------------------------------------------------------
def _compile_time(fn):
    """A function the Triton kernels call at compile time on constexpr arguments (also callable here)."""
    return triton.constexpr_function(fn) if HAS_TRITON else fn


WHOLE_WINDOW_BLOCK = 1024  # a block this wide takes a window in one power-of-2 piece (the interpreter's)


@_compile_time
def block_pieces(tokens: int, block: int) -> tuple[tuple[int, int], ...]:
    """``(start, width)`` of the blocks the Triton kernels cut ``tokens`` rows or keys of a window into:
    full blocks of ``block``, then the rest rounded up to 16 in power-of-2 pieces, largest first (196 tokens
    in blocks of 64: 64, 64, 64, 16, i.e. 208 rows instead of 256). A block of ``WHOLE_WINDOW_BLOCK`` takes
    the window in one piece (the interpreter pays per block step, not per element)."""
    if block >= WHOLE_WINDOW_BLOCK:
        return ((0, max(16, 1 << (tokens - 1).bit_length())),)
    full, rest = divmod(tokens, block)
    pieces = [(i * block, block) for i in range(full)]
    rest, start, width = -(-rest // 16) * 16, full * block, block
    while rest:
        if rest >= width:
            pieces.append((start, width))
            start, rest = start + width, rest - width
        width //= 2
    return tuple(pieces)


@_compile_time
def padded_tokens(tokens: int) -> int:
    """Rows and keys the dense bias and the dS partials are padded to: a power of 2, so that every
    ``block_pieces`` (at most that many) indexes inside them."""
    return max(16, 1 << (tokens - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:
    _LOG2E = tl.constexpr(LOG2E)
    _SHIFT_MASK_2 = tl.constexpr(SHIFT_MASK_VALUE * LOG2E)  # the shift mask in base-2 scores

    @triton.constexpr_function
    def _num_pieces(n, block):
        return len(block_pieces(n, block))

    @triton.constexpr_function
    def _full_pieces(n, block):
        """How many of ``block_pieces(n, block)`` are whole blocks inside the window (the others reach past n
        or are narrower)."""
        return n // block

    @triton.constexpr_function
    def _piece_start(i, n, block):
        return block_pieces(n, block)[i][0]

    @triton.constexpr_function
    def _piece_width(i, n, block):
        return block_pieces(n, block)[i][1]

    @triton.constexpr_function
    def _past_window(i, n, block):
        """Whether piece ``i`` of ``block_pieces(n, block)`` reaches past the window's n tokens."""
        start, width = block_pieces(n, block)[i]
        return start + width > n

    # ----------------------------------------------------------------------------------------------
    # Where tokens are: padding, cyclic shift, window partition and crop as address arithmetic.
    # ``vol`` = ((T, H, W), padded (T, H, W), q/k/v strides (b, t, h, w, head)); ``WIN`` = the constexpr tuple
    # (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX) (constexpr tuples keep their items constexpr when indexed).
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _volume(
        T, H, W, s_b, s_t, s_h, s_w, s_n, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, WIDE_INDEX: tl.constexpr
    ):
        """``vol``: the extents, the extents padded to whole windows and the strides. ``WIDE_INDEX``: index
        arithmetic in int64 (the interpreter checks every int32 operation for overflow, which makes it slow
        there; compiled kernels take int32)."""
        index = tl.int64 if WIDE_INDEX else tl.int32
        t, h, w = tl.cast(T, index), tl.cast(H, index), tl.cast(W, index)
        padded = ((t + WT - 1) // WT * WT, (h + WH - 1) // WH * WH, (w + WW - 1) // WW * WW)
        return (t, h, w), padded, (s_b, s_t, s_h, s_w, s_n)

    @triton.jit
    def _window_origin(win, vol, WIN: tl.constexpr):
        """Window ``win`` (linear over batch and windows) -> where its first token comes from: the volume
        coordinates (t, h, w) before the wrap of the cyclic shift, its element offset in q/k/v (int64) and
        its flat token offset in contiguous ``(B, T, H, W)`` tensors."""
        extents, padded, strides = vol
        T, H, W = extents
        TP, HP, WP = padded
        s_b, s_t, s_h, s_w, _ = strides
        WT: tl.constexpr = WIN[1]
        WH: tl.constexpr = WIN[2]
        WW: tl.constexpr = WIN[3]
        ST: tl.constexpr = WIN[4]
        SH: tl.constexpr = WIN[5]
        SW: tl.constexpr = WIN[6]
        win = tl.cast(win, T.dtype)
        rest = win // (WP // WW)
        rest_h = rest // (HP // WH)
        b = rest_h // (TP // WT)
        t0 = rest_h % (TP // WT) * WT + ST
        h0 = rest % (HP // WH) * WH + SH
        w0 = win % (WP // WW) * WW + SW
        elem = (
            tl.cast(b, tl.int64) * s_b
            + tl.cast(t0, tl.int64) * s_t
            + tl.cast(h0, tl.int64) * s_h
            + tl.cast(w0, tl.int64) * s_w
        )
        return t0, h0, w0, elem, ((b * T + t0) * H + h0) * W + w0

    @triton.jit
    def _tokens(origin, offs, vol, WIN: tl.constexpr):
        """The tokens at in-window indices ``offs`` of the window at ``origin`` (``_window_origin``): element
        offsets in q/k/v (int64, without the head's), flat token offsets, validity (a real token: not padding,
        not past N) and shift region. The volume is rolled by -shift: the window's padded coordinate p holds
        token p + shift, wrapped to the start of an axis where it passes the padded extent (Swin's last
        region along that axis: tokens of one window differ in region exactly where they differ in wraps)."""
        extents, padded, strides = vol
        T, H, W = extents
        TP, HP, WP = padded
        _, s_t, s_h, s_w, _ = strides
        t0, h0, w0, origin_elem, origin_tok = origin
        N: tl.constexpr = WIN[0]
        WH: tl.constexpr = WIN[2]
        WW: tl.constexpr = WIN[3]
        ST: tl.constexpr = WIN[4]
        SH: tl.constexpr = WIN[5]
        SW: tl.constexpr = WIN[6]
        WIDE_INDEX: tl.constexpr = WIN[7]
        offs = offs.to(tl.int64 if WIDE_INDEX else tl.int32)
        t = offs // (WH * WW)
        h = (offs // WW) % WH
        w = offs % WW
        elem = origin_elem + (t.to(tl.int64) * s_t + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w)
        tok = origin_tok + (t * H + h) * W + w
        ot = t0 + t
        oh = h0 + h
        ow = w0 + w
        region = 0
        if ST > 0:
            wrap = ot >= TP
            ot = tl.where(wrap, ot - TP, ot)
            elem -= wrap.to(tl.int64) * (tl.cast(TP, tl.int64) * s_t)
            tok = tl.where(wrap, tok - TP * H * W, tok)
            region = region + tl.where(wrap, 4, 0)
        if SH > 0:
            wrap = oh >= HP
            oh = tl.where(wrap, oh - HP, oh)
            elem -= wrap.to(tl.int64) * (tl.cast(HP, tl.int64) * s_h)
            tok = tl.where(wrap, tok - HP * W, tok)
            region = region + tl.where(wrap, 2, 0)
        if SW > 0:
            wrap = ow >= WP
            ow = tl.where(wrap, ow - WP, ow)
            elem -= wrap.to(tl.int64) * (tl.cast(WP, tl.int64) * s_w)
            tok = tl.where(wrap, tok - WP, tok)
            region = region + tl.where(wrap, 1, 0)
        valid = (offs < N) & (ot < T) & (oh < H) & (ow < W)
        return elem, tok, valid, region

    @triton.jit
    def _pad_row(PAD, head, offs_d, HD, HAS_PAD: tl.constexpr):
        """``PAD[head]`` (the key or value of padded tokens), or 0 without pad rows."""
        if HAS_PAD:
            return tl.load(PAD + head * HD + offs_d, mask=offs_d < HD, other=0.0)
        else:
            return 0.0

    @triton.jit
    def _load_rows(X, elem, valid, offs_d, HD, pad, HAS_PAD: tl.constexpr):
        """Rows of head_dim at element offsets ``elem`` (the head's included); rows of invalid tokens take
        ``pad`` (a row) with ``HAS_PAD``, else zeros. Every q/k/v/o/dO row load goes through here: compile_check
        asserts that its loads are as wide as the launch's alignment and the tile allow."""
        x = tl.load(X + elem[:, None] + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < HD), other=0.0)
        if HAS_PAD:
            x = tl.where(valid[:, None], x, pad[None, :].to(x.dtype))
        return x

    @triton.jit
    def _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT: tl.constexpr):
        """``head_kv`` of ``_key_rows`` for ``head``: its pad rows, its element offset, ``offs_d`` and head_dim."""
        HAS_PAD_K: tl.constexpr = FEAT[3]
        HAS_PAD_V: tl.constexpr = FEAT[4]
        _, _, strides = vol
        _, _, _, _, s_n = strides
        return (
            _pad_row(PAD_K, head, offs_d, HD, HAS_PAD_K),
            _pad_row(PAD_V, head, offs_d, HD, HAS_PAD_V),
            tl.cast(head, tl.int64) * s_n,
            offs_d,
            HD,
        )

    @triton.jit
    def _key_rows(K, V, head_kv, origin, offs_n, vol, WIN: tl.constexpr, FEAT: tl.constexpr):
        """Keys and values of tokens ``offs_n`` of the window at ``origin`` (pad rows where the token is padding),
        with the tokens' indices, validity and shift regions; ``head_kv`` = (pad_k, pad_v, head_elem, offs_d, HD)."""
        HAS_PAD_K: tl.constexpr = FEAT[3]
        HAS_PAD_V: tl.constexpr = FEAT[4]
        pad_k, pad_v, head_elem, offs_d, HD = head_kv
        elem_n, tok_n, valid_n, region_n = _tokens(origin, offs_n, vol, WIN)
        k = _load_rows(K, elem_n + head_elem, valid_n, offs_d, HD, pad_k, HAS_PAD_K)
        v = _load_rows(V, elem_n + head_elem, valid_n, offs_d, HD, pad_v, HAS_PAD_V)
        return k, v, tok_n, valid_n, region_n

    @triton.jit
    def _query_rows(Q, head_kv, origin, offs_m, vol, WIN: tl.constexpr):
        """Queries of tokens ``offs_m`` of the window at ``origin`` (zeros where padding), with the tokens'
        indices, validity and shift regions."""
        _, _, head_elem, offs_d, HD = head_kv
        elem_m, tok_m, valid_m, region_m = _tokens(origin, offs_m, vol, WIN)
        return _load_rows(Q, elem_m + head_elem, valid_m, offs_d, HD, 0.0, False), tok_m, valid_m, region_m

    @triton.jit
    def _query_grad_rows(DO, Lse, Delta, rows, valid_m, offs_d, HD):
        """dO, the base-2 log-sum-exp and delta of the query rows ``rows`` (token * heads + head)."""
        do = _load_rows(DO, rows * HD, valid_m, offs_d, HD, 0.0, False)
        lse = tl.load(Lse + rows, mask=valid_m, other=0.0)
        delta = tl.load(Delta + rows, mask=valid_m, other=0.0)
        return do, lse, delta

    # ----------------------------------------------------------------------------------------------
    # Scores in base 2. ``FEAT`` = the constexpr tuple (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V);
    # ``bias_c`` = (BIAS, MASK, num_masks, qk_scale): the call's dense bias (``dense_bias``: bias / scale per
    # head, zero-padded to (NK, NK)), the attn_mask, and scale * log2(e).
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _bias_tile(BIAS, head, offs_m, offs_n, N: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The dense bias at (queries ``offs_m``, keys ``offs_n``) of ``head`` (every index is inside the
        zero-padded slice) in fp32 (the products' accumulators), whatever dtype it is stored in; or 0 without a
        bias table."""
        NK: tl.constexpr = padded_tokens(N)
        if HAS_BIAS:
            return tl.load(BIAS + (head * NK + offs_m[:, None]) * NK + offs_n[None, :]).to(tl.float32)
        else:
            return 0.0

    @triton.jit
    def _scores_base2(
        q,
        k,
        bias,
        win,
        offs_m,
        offs_n,
        region_m,
        region_n,
        bias_c,
        N: tl.constexpr,
        SHIFTED: tl.constexpr,
        KEY_TAIL: tl.constexpr,
        FEAT: tl.constexpr,
    ):
        """``log2(e) * (scale q k^T + bias + shift mask + attn_mask)`` in fp32: the bias tile (``_bias_tile``)
        initialises the product's accumulator, ``qk_scale`` scales both; with ``KEY_TAIL`` (the block
        reaches past the window) keys beyond N get -inf."""
        HAS_BIAS: tl.constexpr = FEAT[0]
        HAS_MASK: tl.constexpr = FEAT[1]
        PRECISION: tl.constexpr = FEAT[2]
        _, MASK, num_masks, qk_scale = bias_c
        if HAS_BIAS:
            s = tl.dot(q, tl.trans(k), acc=bias, input_precision=PRECISION) * qk_scale
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SHIFTED:
            s += tl.where(region_m[:, None] != region_n[None, :], _SHIFT_MASK_2, 0.0)
        if HAS_MASK:
            pair_ok = (offs_m[:, None] < N) & (offs_n[None, :] < N)
            mask_ptrs = MASK + (win % num_masks).to(tl.int64) * (N * N) + offs_m[:, None] * N + offs_n[None, :]
            s += tl.load(mask_ptrs, mask=pair_ok, other=0.0) * _LOG2E
        if KEY_TAIL:
            s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        return s

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _key_block_scores(
        q,
        offs_m,
        region_m,
        head,
        K,
        V,
        head_kv,
        origin,
        start_n,
        vol,
        win,
        bias_c,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        WIDTH: tl.constexpr,
        KEY_TAIL: tl.constexpr,
    ):
        """Keys and values ``start_n + arange(WIDTH)`` of the window and the base-2 scores of the queries
        ``offs_m`` against them."""
        HAS_BIAS: tl.constexpr = FEAT[0]
        N: tl.constexpr = WIN[0]
        ST: tl.constexpr = WIN[4]
        SH: tl.constexpr = WIN[5]
        SW: tl.constexpr = WIN[6]
        BIAS, MASK, num_masks, qk_scale = bias_c
        offs_n = start_n + tl.arange(0, WIDTH)
        k, v, _, _, region_n = _key_rows(K, V, head_kv, origin, offs_n, vol, WIN, FEAT)
        s = _scores_base2(
            q,
            k,
            _bias_tile(BIAS, head, offs_m, offs_n, N, HAS_BIAS),
            win,
            offs_m,
            offs_n,
            region_m,
            region_n,
            bias_c,
            N,
            (ST > 0) | (SH > 0) | (SW > 0),
            KEY_TAIL,
            FEAT,
        )
        return k, v, s

    @triton.jit
    def _fwd_key_block(
        m_i,
        l_i,
        acc,
        q,
        rows,
        K,
        V,
        head_kv,
        origin,
        start_n,
        vol,
        win,
        bias_c,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        WIDTH: tl.constexpr,
        KEY_TAIL: tl.constexpr,
    ):
        """One key block of the online softmax: keys ``start_n + arange(WIDTH)``."""
        PRECISION: tl.constexpr = FEAT[2]
        offs_m, region_m, head = rows
        _, v, s = _key_block_scores(
            q, offs_m, region_m, head, K, V, head_kv, origin, start_n, vol, win, bias_c, WIN, FEAT, WIDTH, KEY_TAIL
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _fwd_rows(
        Q,
        K,
        V,
        Out,
        Lse,
        PAD_K,
        PAD_V,
        vol,
        NH,
        HD,
        num_windows,
        bias_c,
        start_m,
        BLOCK_M: tl.constexpr,
        N: tl.constexpr,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Queries ``start_m + arange(BLOCK_M)`` of one head in every ``num_programs(2)``-th window: the full
        key blocks in a loop, then the 16-granular tail pieces of ``block_pieces(N, BLOCK_N)``."""
        head = tl.program_id(1)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        head_kv = _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT)
        for win in range(tl.program_id(2), num_windows, tl.num_programs(2)):
            origin = _window_origin(win, vol, WIN)
            q, tok_m, valid_m, region_m = _query_rows(Q, head_kv, origin, offs_m, vol, WIN)
            rows = (offs_m, region_m, head)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
            acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
            for start_n in tl.range(0, _full_pieces(N, BLOCK_N) * BLOCK_N, BLOCK_N):
                m_i, l_i, acc = _fwd_key_block(
                    m_i, l_i, acc, q, rows, K, V, head_kv, origin, start_n, vol, win, bias_c, WIN, FEAT, BLOCK_N, False
                )
            for j in tl.static_range(_full_pieces(N, BLOCK_N), _num_pieces(N, BLOCK_N)):
                m_i, l_i, acc = _fwd_key_block(
                    m_i,
                    l_i,
                    acc,
                    q,
                    rows,
                    K,
                    V,
                    head_kv,
                    origin,
                    _piece_start(j, N, BLOCK_N),
                    vol,
                    win,
                    bias_c,
                    WIN,
                    FEAT,
                    _piece_width(j, N, BLOCK_N),
                    _past_window(j, N, BLOCK_N),
                )
            rows_out = tl.cast(tok_m, tl.int64) * NH + head
            tl.store(
                Out + rows_out[:, None] * HD + offs_d[None, :],
                (acc / l_i[:, None]).to(Out.dtype.element_ty),
                mask=valid_m[:, None] & (offs_d[None, :] < HD),
            )
            tl.store(Lse + rows_out, m_i + tl.math.log2(l_i), mask=valid_m)

    @triton.jit
    def _window_attn_fwd_kernel(
        Q,
        K,
        V,
        Out,
        Lse,
        BIAS,
        PAD_K,
        PAD_V,
        MASK,
        s_b,
        s_t,
        s_h,
        s_w,
        s_n,
        T,
        H,
        W,
        NH,
        HD,
        num_masks,
        num_windows,
        qk_scale,
        N: tl.constexpr,
        WT: tl.constexpr,
        WH: tl.constexpr,
        WW: tl.constexpr,
        ST: tl.constexpr,
        SH: tl.constexpr,
        SW: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_PAD_K: tl.constexpr,
        HAS_PAD_V: tl.constexpr,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
        WIDE_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Persistent forward: program (query piece, head, window group) attends its queries in the group's
        windows ``program_id(2) + k * num_programs(2)``. Query pieces are ``block_pieces(N, BLOCK_M)``: whole
        blocks, then 16-granular tail pieces (each width its own code path). q, k, v share the strides
        ``s_*``. Writes the output and the base-2 log-sum-exp of every real query's scores."""
        pid = tl.program_id(0)
        vol = _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT, WH, WW, WIDE_INDEX)
        WIN: tl.constexpr = (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX)
        FEAT: tl.constexpr = (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V)
        bias_c = (BIAS, MASK, num_masks, qk_scale)
        if _full_pieces(N, BLOCK_M) > 0 and pid < _full_pieces(N, BLOCK_M):
            _fwd_rows(
                Q,
                K,
                V,
                Out,
                Lse,
                PAD_K,
                PAD_V,
                vol,
                NH,
                HD,
                num_windows,
                bias_c,
                pid * BLOCK_M,
                BLOCK_M,
                N,
                WIN,
                FEAT,
                BLOCK_N,
                BLOCK_D,
            )
        for i in tl.static_range(_full_pieces(N, BLOCK_M), _num_pieces(N, BLOCK_M)):
            if pid == i:
                _fwd_rows(
                    Q,
                    K,
                    V,
                    Out,
                    Lse,
                    PAD_K,
                    PAD_V,
                    vol,
                    NH,
                    HD,
                    num_windows,
                    bias_c,
                    _piece_start(i, N, BLOCK_M),
                    _piece_width(i, N, BLOCK_M),
                    N,
                    WIN,
                    FEAT,
                    BLOCK_N,
                    BLOCK_D,
                )

    # ----------------------------------------------------------------------------------------------
    # Backward A: dq and delta = rowsum(dO * O)
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _dq_key_block(
        dq,
        q,
        do,
        lse,
        delta,
        rows,
        K,
        V,
        head_kv,
        origin,
        start_n,
        vol,
        win,
        bias_c,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        WIDTH: tl.constexpr,
        KEY_TAIL: tl.constexpr,
    ):
        """dq contribution of the keys ``start_n + arange(WIDTH)``."""
        PRECISION: tl.constexpr = FEAT[2]
        offs_m, region_m, head, valid_m = rows
        k, v, s = _key_block_scores(
            q, offs_m, region_m, head, K, V, head_kv, origin, start_n, vol, win, bias_c, WIN, FEAT, WIDTH, KEY_TAIL
        )
        p = tl.where(valid_m[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    @triton.jit
    def _dq_rows(
        Q,
        K,
        V,
        Out,
        DO,
        Lse,
        Delta,
        DQ,
        PAD_K,
        PAD_V,
        vol,
        NH,
        HD,
        num_windows,
        grad_c,
        bias_c,
        start_m,
        BLOCK_M: tl.constexpr,
        N: tl.constexpr,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """dq and delta of queries ``start_m + arange(BLOCK_M)`` of one head in the group's windows: the full
        key blocks in a loop, then the tail pieces."""
        grad_token_stride, grad_head_stride, scale = grad_c
        head = tl.program_id(1)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HD
        head_kv = _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT)
        for win in range(tl.program_id(2), num_windows, tl.num_programs(2)):
            origin = _window_origin(win, vol, WIN)
            q, tok_m, valid_m, region_m = _query_rows(Q, head_kv, origin, offs_m, vol, WIN)
            rows = tl.cast(tok_m, tl.int64) * NH + head
            do = _load_rows(DO, rows * HD, valid_m, offs_d, HD, 0.0, False)
            o = _load_rows(Out, rows * HD, valid_m, offs_d, HD, 0.0, False)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            tl.store(Delta + rows, delta, mask=valid_m)
            lse = tl.load(Lse + rows, mask=valid_m, other=0.0)
            query = (offs_m, region_m, head, valid_m)
            dq = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
            for start_n in tl.range(0, _full_pieces(N, BLOCK_N) * BLOCK_N, BLOCK_N):
                dq = _dq_key_block(
                    dq,
                    q,
                    do,
                    lse,
                    delta,
                    query,
                    K,
                    V,
                    head_kv,
                    origin,
                    start_n,
                    vol,
                    win,
                    bias_c,
                    WIN,
                    FEAT,
                    BLOCK_N,
                    False,
                )
            for j in tl.static_range(_full_pieces(N, BLOCK_N), _num_pieces(N, BLOCK_N)):
                dq = _dq_key_block(
                    dq,
                    q,
                    do,
                    lse,
                    delta,
                    query,
                    K,
                    V,
                    head_kv,
                    origin,
                    _piece_start(j, N, BLOCK_N),
                    vol,
                    win,
                    bias_c,
                    WIN,
                    FEAT,
                    _piece_width(j, N, BLOCK_N),
                    _past_window(j, N, BLOCK_N),
                )
            grad_rows = tl.cast(tok_m, tl.int64) * grad_token_stride + head * grad_head_stride
            tl.store(
                DQ + grad_rows[:, None] + offs_d[None, :],
                (dq * scale).to(DQ.dtype.element_ty),
                mask=valid_m[:, None] & d_ok,
            )

    @triton.jit
    def _window_attn_bwd_dq_kernel(
        Q,
        K,
        V,
        Out,
        DO,
        Lse,
        Delta,
        DQ,
        BIAS,
        PAD_K,
        PAD_V,
        MASK,
        s_b,
        s_t,
        s_h,
        s_w,
        s_n,
        T,
        H,
        W,
        NH,
        HD,
        num_masks,
        num_windows,
        grad_token_stride,
        grad_head_stride,
        scale,
        qk_scale,
        N: tl.constexpr,
        WT: tl.constexpr,
        WH: tl.constexpr,
        WW: tl.constexpr,
        ST: tl.constexpr,
        SH: tl.constexpr,
        SW: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_PAD_K: tl.constexpr,
        HAS_PAD_V: tl.constexpr,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
        WIDE_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Persistent backward A: program (query piece, head, window group) writes dq and ``Delta`` of its
        queries in the group's windows. Gradient rows sit ``grad_token_stride`` elements apart per token and
        ``grad_head_stride`` per head (contiguous, or one packed dqkv)."""
        pid = tl.program_id(0)
        vol = _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT, WH, WW, WIDE_INDEX)
        WIN: tl.constexpr = (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX)
        FEAT: tl.constexpr = (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V)
        bias_c = (BIAS, MASK, num_masks, qk_scale)
        grad_c = (grad_token_stride, grad_head_stride, scale)
        if _full_pieces(N, BLOCK_M) > 0 and pid < _full_pieces(N, BLOCK_M):
            _dq_rows(
                Q,
                K,
                V,
                Out,
                DO,
                Lse,
                Delta,
                DQ,
                PAD_K,
                PAD_V,
                vol,
                NH,
                HD,
                num_windows,
                grad_c,
                bias_c,
                pid * BLOCK_M,
                BLOCK_M,
                N,
                WIN,
                FEAT,
                BLOCK_N,
                BLOCK_D,
            )
        for i in tl.static_range(_full_pieces(N, BLOCK_M), _num_pieces(N, BLOCK_M)):
            if pid == i:
                _dq_rows(
                    Q,
                    K,
                    V,
                    Out,
                    DO,
                    Lse,
                    Delta,
                    DQ,
                    PAD_K,
                    PAD_V,
                    vol,
                    NH,
                    HD,
                    num_windows,
                    grad_c,
                    bias_c,
                    _piece_start(i, N, BLOCK_M),
                    _piece_width(i, N, BLOCK_M),
                    N,
                    WIN,
                    FEAT,
                    BLOCK_N,
                    BLOCK_D,
                )

    # ----------------------------------------------------------------------------------------------
    # Backward A2: per window group the dS sums, the bias gradient's partial
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _dbias_tile(
        Q,
        K,
        V,
        DO,
        Lse,
        Delta,
        DBIAS,
        PAD_K,
        PAD_V,
        vol,
        NH,
        HD,
        num_windows,
        bias_c,
        start_m,
        BLOCK_M: tl.constexpr,
        start_n,
        BLOCK_N: tl.constexpr,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """dS of queries ``start_m + arange(BLOCK_M)`` and keys ``start_n + arange(BLOCK_N)`` of one head summed
        over the group's windows in registers, stored once into ``DBIAS[group, head]`` (a zero-padded (NK, NK)
        slice); the bias tile stays in registers for all the windows."""
        HAS_BIAS: tl.constexpr = FEAT[0]
        PRECISION: tl.constexpr = FEAT[2]
        ST: tl.constexpr = WIN[4]
        SH: tl.constexpr = WIN[5]
        SW: tl.constexpr = WIN[6]
        BIAS, MASK, num_masks, qk_scale = bias_c
        N: tl.constexpr = WIN[0]
        NK: tl.constexpr = padded_tokens(N)
        head = tl.program_id(1)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        head_kv = _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT)
        bias = _bias_tile(BIAS, head, offs_m, offs_n, N, HAS_BIAS)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for win in range(tl.program_id(2), num_windows, tl.num_programs(2)):
            origin = _window_origin(win, vol, WIN)
            q, tok_m, valid_m, region_m = _query_rows(Q, head_kv, origin, offs_m, vol, WIN)
            k, v, _, _, region_n = _key_rows(K, V, head_kv, origin, offs_n, vol, WIN, FEAT)
            do, lse, delta = _query_grad_rows(DO, Lse, Delta, tl.cast(tok_m, tl.int64) * NH + head, valid_m, offs_d, HD)
            # keys past N need no -inf: their sums are never read
            s = _scores_base2(
                q,
                k,
                bias,
                win,
                offs_m,
                offs_n,
                region_m,
                region_n,
                bias_c,
                N,
                (ST > 0) | (SH > 0) | (SW > 0),
                False,
                FEAT,
            )
            p = tl.where(valid_m[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
            acc += p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        base = DBIAS + ((tl.program_id(2) * NH + head) * NK).to(tl.int64) * NK
        tl.store(base + offs_m[:, None] * NK + offs_n[None, :], acc)

    @triton.jit
    def _dbias_rows(
        Q,
        K,
        V,
        DO,
        Lse,
        Delta,
        DBIAS,
        PAD_K,
        PAD_V,
        vol,
        NH,
        HD,
        num_windows,
        bias_c,
        start_m,
        BLOCK_M: tl.constexpr,
        key_piece,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """``_dbias_tile`` of the program's key piece ``key_piece`` of ``block_pieces(N, BLOCK_N)``."""
        N: tl.constexpr = WIN[0]
        if _full_pieces(N, BLOCK_N) > 0 and key_piece < _full_pieces(N, BLOCK_N):
            _dbias_tile(
                Q,
                K,
                V,
                DO,
                Lse,
                Delta,
                DBIAS,
                PAD_K,
                PAD_V,
                vol,
                NH,
                HD,
                num_windows,
                bias_c,
                start_m,
                BLOCK_M,
                key_piece * BLOCK_N,
                BLOCK_N,
                WIN,
                FEAT,
                BLOCK_D,
            )
        for j in tl.static_range(_full_pieces(N, BLOCK_N), _num_pieces(N, BLOCK_N)):
            if key_piece == j:
                _dbias_tile(
                    Q,
                    K,
                    V,
                    DO,
                    Lse,
                    Delta,
                    DBIAS,
                    PAD_K,
                    PAD_V,
                    vol,
                    NH,
                    HD,
                    num_windows,
                    bias_c,
                    start_m,
                    BLOCK_M,
                    _piece_start(j, N, BLOCK_N),
                    _piece_width(j, N, BLOCK_N),
                    WIN,
                    FEAT,
                    BLOCK_D,
                )

    @triton.jit
    def _window_attn_bwd_dbias_kernel(
        Q,
        K,
        V,
        DO,
        Lse,
        Delta,
        DBIAS,
        BIAS,
        PAD_K,
        PAD_V,
        MASK,
        s_b,
        s_t,
        s_h,
        s_w,
        s_n,
        T,
        H,
        W,
        NH,
        HD,
        num_masks,
        num_windows,
        qk_scale,
        N: tl.constexpr,
        WT: tl.constexpr,
        WH: tl.constexpr,
        WW: tl.constexpr,
        ST: tl.constexpr,
        SH: tl.constexpr,
        SW: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_PAD_K: tl.constexpr,
        HAS_PAD_V: tl.constexpr,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
        WIDE_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Persistent backward A2: program (query piece x key piece, head, window group) sums the dS tile of
        its queries and keys over the group's windows into ``DBIAS (groups, NH, NK, NK)``; reads ``Delta``
        from backward A. (Holding a whole query row of dS sums per program, as backward A would have to,
        spills registers; this recomputes the tile's scores instead: a third pass of exps.)"""
        vol = _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT, WH, WW, WIDE_INDEX)
        WIN: tl.constexpr = (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX)
        FEAT: tl.constexpr = (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V)
        bias_c = (BIAS, MASK, num_masks, qk_scale)
        query_piece = tl.program_id(0) // _num_pieces(N, BLOCK_N)
        key_piece = tl.program_id(0) % _num_pieces(N, BLOCK_N)
        if _full_pieces(N, BLOCK_M) > 0 and query_piece < _full_pieces(N, BLOCK_M):
            _dbias_rows(
                Q,
                K,
                V,
                DO,
                Lse,
                Delta,
                DBIAS,
                PAD_K,
                PAD_V,
                vol,
                NH,
                HD,
                num_windows,
                bias_c,
                query_piece * BLOCK_M,
                BLOCK_M,
                key_piece,
                WIN,
                FEAT,
                BLOCK_N,
                BLOCK_D,
            )
        for i in tl.static_range(_full_pieces(N, BLOCK_M), _num_pieces(N, BLOCK_M)):
            if query_piece == i:
                _dbias_rows(
                    Q,
                    K,
                    V,
                    DO,
                    Lse,
                    Delta,
                    DBIAS,
                    PAD_K,
                    PAD_V,
                    vol,
                    NH,
                    HD,
                    num_windows,
                    bias_c,
                    _piece_start(i, N, BLOCK_M),
                    _piece_width(i, N, BLOCK_M),
                    key_piece,
                    WIN,
                    FEAT,
                    BLOCK_N,
                    BLOCK_D,
                )

    # ----------------------------------------------------------------------------------------------
    # Backward B: dk, dv, and per program the pad rows' gradient sums
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _dkdv_query_block(
        dk,
        dv,
        k,
        v,
        keys,
        Q,
        DO,
        Lse,
        Delta,
        origin,
        start_m,
        vol,
        NH,
        head_kv,
        win,
        bias_c,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        WIDTH: tl.constexpr,
    ):
        """dk and dv contributions of the queries ``start_m + arange(WIDTH)`` to the program's keys."""
        HAS_BIAS: tl.constexpr = FEAT[0]
        PRECISION: tl.constexpr = FEAT[2]
        N: tl.constexpr = WIN[0]
        ST: tl.constexpr = WIN[4]
        SH: tl.constexpr = WIN[5]
        SW: tl.constexpr = WIN[6]
        BIAS, MASK, num_masks, qk_scale = bias_c
        offs_n, region_n, head = keys
        offs_m = start_m + tl.arange(0, WIDTH)
        q, tok_m, valid_m, region_m = _query_rows(Q, head_kv, origin, offs_m, vol, WIN)
        _, _, _, offs_d, HD = head_kv
        do, lse, delta = _query_grad_rows(DO, Lse, Delta, tl.cast(tok_m, tl.int64) * NH + head, valid_m, offs_d, HD)
        # keys past N need no -inf: their dk/dv rows are neither stored nor summed into the pad gradients
        s = _scores_base2(
            q,
            k,
            _bias_tile(BIAS, head, offs_m, offs_n, N, HAS_BIAS),
            win,
            offs_m,
            offs_n,
            region_m,
            region_n,
            bias_c,
            N,
            (ST > 0) | (SH > 0) | (SW > 0),
            False,
            FEAT,
        )
        p = tl.where(valid_m[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _dkdv_keys(
        Q,
        K,
        V,
        DO,
        Lse,
        Delta,
        DK,
        DV,
        DPAD,
        PAD_K,
        PAD_V,
        vol,
        NH,
        HD,
        num_windows,
        grad_c,
        bias_c,
        dpad_row,
        start_n,
        BLOCK_N: tl.constexpr,
        N: tl.constexpr,
        WIN: tl.constexpr,
        FEAT: tl.constexpr,
        NEED_DPAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """dk, dv of keys ``start_n + arange(BLOCK_N)`` of one head in the group's windows, the full query
        blocks in a loop, then the tail pieces. The pad rows' gradients of the keys that are padding are summed
        over the group's windows and stored once into ``DPAD[dpad_row, 0|1, head]``."""
        grad_token_stride, grad_head_stride, scale = grad_c
        head = tl.program_id(1)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HD
        head_kv = _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT)
        dpad_k = tl.full((BLOCK_D,), 0.0, tl.float32)
        dpad_v = tl.full((BLOCK_D,), 0.0, tl.float32)
        for win in range(tl.program_id(2), num_windows, tl.num_programs(2)):
            origin = _window_origin(win, vol, WIN)
            k, v, tok_n, valid_n, region_n = _key_rows(K, V, head_kv, origin, offs_n, vol, WIN, FEAT)
            keys = (offs_n, region_n, head)
            dk = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
            dv = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
            for start_m in tl.range(0, _full_pieces(N, BLOCK_M) * BLOCK_M, BLOCK_M):
                dk, dv = _dkdv_query_block(
                    dk,
                    dv,
                    k,
                    v,
                    keys,
                    Q,
                    DO,
                    Lse,
                    Delta,
                    origin,
                    start_m,
                    vol,
                    NH,
                    head_kv,
                    win,
                    bias_c,
                    WIN,
                    FEAT,
                    BLOCK_M,
                )
            for j in tl.static_range(_full_pieces(N, BLOCK_M), _num_pieces(N, BLOCK_M)):
                dk, dv = _dkdv_query_block(
                    dk,
                    dv,
                    k,
                    v,
                    keys,
                    Q,
                    DO,
                    Lse,
                    Delta,
                    origin,
                    _piece_start(j, N, BLOCK_M),
                    vol,
                    NH,
                    head_kv,
                    win,
                    bias_c,
                    WIN,
                    FEAT,
                    _piece_width(j, N, BLOCK_M),
                )
            dk = dk * scale
            grad_rows = tl.cast(tok_n, tl.int64) * grad_token_stride + head * grad_head_stride
            grad_ptrs = grad_rows[:, None] + offs_d[None, :]
            tl.store(DK + grad_ptrs, dk.to(DK.dtype.element_ty), mask=valid_n[:, None] & d_ok)
            tl.store(DV + grad_ptrs, dv.to(DV.dtype.element_ty), mask=valid_n[:, None] & d_ok)
            if NEED_DPAD:
                padding = ((offs_n < N) & (valid_n == 0))[:, None]
                dpad_k += tl.sum(tl.where(padding, dk, 0.0), axis=0)
                dpad_v += tl.sum(tl.where(padding, dv, 0.0), axis=0)
        if NEED_DPAD:
            base = DPAD + ((dpad_row * 2 * NH + head) * HD).to(tl.int64)
            tl.store(base + offs_d, dpad_k, mask=offs_d < HD)
            tl.store(base + NH * HD + offs_d, dpad_v, mask=offs_d < HD)

    @triton.jit
    def _window_attn_bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        Lse,
        Delta,
        DK,
        DV,
        DPAD,
        BIAS,
        PAD_K,
        PAD_V,
        MASK,
        s_b,
        s_t,
        s_h,
        s_w,
        s_n,
        T,
        H,
        W,
        NH,
        HD,
        num_masks,
        num_windows,
        grad_token_stride,
        grad_head_stride,
        scale,
        qk_scale,
        N: tl.constexpr,
        WT: tl.constexpr,
        WH: tl.constexpr,
        WW: tl.constexpr,
        ST: tl.constexpr,
        SH: tl.constexpr,
        SW: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_PAD_K: tl.constexpr,
        HAS_PAD_V: tl.constexpr,
        HAS_MASK: tl.constexpr,
        NEED_DPAD: tl.constexpr,
        PRECISION: tl.constexpr,
        WIDE_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Persistent backward B: program (key piece, head, window group) writes dk, dv of its keys in the
        group's windows and, with ``NEED_DPAD``, its pad-row gradient sums into ``DPAD (groups * pieces, 2,
        NH, HD)``. Key pieces are ``block_pieces(N, BLOCK_N)``; reads ``Delta`` from backward A."""
        pid = tl.program_id(0)
        vol = _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT, WH, WW, WIDE_INDEX)
        WIN: tl.constexpr = (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX)
        FEAT: tl.constexpr = (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V)
        bias_c = (BIAS, MASK, num_masks, qk_scale)
        grad_c = (grad_token_stride, grad_head_stride, scale)
        dpad_row = tl.program_id(2) * _num_pieces(N, BLOCK_N) + pid
        if _full_pieces(N, BLOCK_N) > 0 and pid < _full_pieces(N, BLOCK_N):
            _dkdv_keys(
                Q,
                K,
                V,
                DO,
                Lse,
                Delta,
                DK,
                DV,
                DPAD,
                PAD_K,
                PAD_V,
                vol,
                NH,
                HD,
                num_windows,
                grad_c,
                bias_c,
                dpad_row,
                pid * BLOCK_N,
                BLOCK_N,
                N,
                WIN,
                FEAT,
                NEED_DPAD,
                BLOCK_M,
                BLOCK_D,
            )
        for i in tl.static_range(_full_pieces(N, BLOCK_N), _num_pieces(N, BLOCK_N)):
            if pid == i:
                _dkdv_keys(
                    Q,
                    K,
                    V,
                    DO,
                    Lse,
                    Delta,
                    DK,
                    DV,
                    DPAD,
                    PAD_K,
                    PAD_V,
                    vol,
                    NH,
                    HD,
                    num_windows,
                    grad_c,
                    bias_c,
                    dpad_row,
                    _piece_start(i, N, BLOCK_N),
                    _piece_width(i, N, BLOCK_N),
                    N,
                    WIN,
                    FEAT,
                    NEED_DPAD,
                    BLOCK_M,
                    BLOCK_D,
                )

    # ----------------------------------------------------------------------------------------------
    # Backward C: the fixed-order reductions of the partials
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _window_attn_bwd_dsum_kernel(DBIAS, DSUM, groups, NH, N: tl.constexpr, BLOCK_S: tl.constexpr):
        """Backward C's first stage (``reduce_stages=2``): program ``(block, head)`` sums ``BLOCK_S`` consecutive
        elements of the groups' dS sums ``DBIAS (groups, NH, NK, NK)`` over the groups, in group order, into
        ``DSUM (1, NH, NK, NK)``: coalesced loads, no gathers; elements of rows or keys past N are zeros."""
        NK: tl.constexpr = padded_tokens(N)
        head = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        inside = (offs // NK < N) & (offs % NK < N)
        acc = tl.full((BLOCK_S,), 0.0, tl.float32)
        for group in range(0, groups):
            acc += tl.load(DBIAS + ((group * NH + head) * NK).to(tl.int64) * NK + offs, mask=inside, other=0.0)
        tl.store(DSUM + (head * NK).to(tl.int64) * NK + offs, acc)

    @triton.jit
    def _window_attn_bwd_reduce_kernel(
        DBIAS,
        DTABLE,
        DPAD,
        DPAD_K,
        DPAD_V,
        groups,
        pad_rows,
        NH,
        HD,
        N: tl.constexpr,
        BH: tl.constexpr,
        BW: tl.constexpr,
        FT: tl.constexpr,
        FH: tl.constexpr,
        FW: tl.constexpr,
        NEED_DTABLE: tl.constexpr,
        NEED_DPAD: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Backward C, one launch for every partial; fixed summation orders, so deterministic.

        Programs ``(e, head)`` below ``cdiv(table_size, BLOCK_E)``: bias-table gradient ``DTABLE[e, head]`` of
        ``BLOCK_E`` entries, the sum over the window groups' dS sums ``DBIAS (groups, NH, NK, NK)`` and over
        queries m of ``dS[m, key]``, where the key sits at m's bias coordinates minus entry e's offset (when
        that is a token of the window). The last program per head: the pad rows' gradients ``DPAD_K, DPAD_V
        (NH, HD)``, the sums of ``DPAD``'s ``pad_rows`` rows."""
        head = tl.program_id(1)
        table_size: tl.constexpr = (2 * FT - 1) * (2 * FH - 1) * (2 * FW - 1)
        table_blocks: tl.constexpr = (table_size + BLOCK_E - 1) // BLOCK_E
        NK: tl.constexpr = padded_tokens(N)
        if NEED_DTABLE and tl.program_id(0) < table_blocks:
            offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
            dt = offs_e // ((2 * FH - 1) * (2 * FW - 1)) - (FT - 1)
            dh = (offs_e // (2 * FW - 1)) % (2 * FH - 1) - (FH - 1)
            dw = offs_e % (2 * FW - 1) - (FW - 1)
            acc = tl.full((BLOCK_E,), 0.0, tl.float32)
            for group in range(0, groups):
                base = DBIAS + ((group * NH + head) * NK).to(tl.int64) * NK
                for start_m in range(0, N, BLOCK_M):
                    offs_m = start_m + tl.arange(0, BLOCK_M)
                    kt = (offs_m // (BH * BW))[None, :] - dt[:, None]
                    kh = ((offs_m // BW) % BH)[None, :] - dh[:, None]
                    kw = (offs_m % BW)[None, :] - dw[:, None]
                    key = (kt * BH + kh) * BW + kw
                    ok = (
                        (offs_e[:, None] < table_size)
                        & (offs_m[None, :] < N)
                        & (kt >= 0)
                        & (kh >= 0)
                        & (kh < BH)
                        & (kw >= 0)
                        & (kw < BW)
                        & (key < N)
                    )
                    acc += tl.sum(tl.load(base + offs_m[None, :] * NK + key, mask=ok, other=0.0), axis=1)
            tl.store(DTABLE + offs_e * NH + head, acc, mask=offs_e < table_size)
        if NEED_DPAD and tl.program_id(0) == tl.num_programs(0) - 1:
            offs_d = tl.arange(0, BLOCK_D)
            dpad_k = tl.full((BLOCK_D,), 0.0, tl.float32)
            dpad_v = tl.full((BLOCK_D,), 0.0, tl.float32)
            for row in range(0, pad_rows):
                base = DPAD + ((row * 2 * NH + head) * HD).to(tl.int64)
                dpad_k += tl.load(base + offs_d, mask=offs_d < HD, other=0.0)
                dpad_v += tl.load(base + NH * HD + offs_d, mask=offs_d < HD, other=0.0)
            tl.store(DPAD_K + head * HD + offs_d, dpad_k, mask=offs_d < HD)
            tl.store(DPAD_V + head * HD + offs_d, dpad_v, mask=offs_d < HD)
