"""break33 H2: for each allowlisted op with a buildable call, the peak RSS growth (MiB) of the op on a stride-0
``expand`` of one element vs on a dense input of the same shape (32 MiB of float32 logical; one process per case and
mode, two at a time, one intra-op thread). COPIES: the expand took 16 MiB or more beyond the dense run, a dense copy
of the argument (``edge_server.op_budget._STRIDED_OK`` lists the ops that make none).

Usage: ``python bench/probe_strided_copies.py [CASE ...] > docs/results/kernels/strided_copies.txt`` (~5 min on 2
cores); ``python bench/probe_strided_copies.py CASE MODE`` is one worker."""

import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

N = 8 << 20  # elements: 32 MiB float32 logical


def cases():
    import torch

    A = torch.ops.aten
    w64 = torch.ones(8, 64)
    C = {}

    def add(name, shape, f):
        C[name] = (shape, f)

    s4 = [1, 64, N // 64 // 64, 64]
    s2 = [N // 64, 64]
    s1 = [1, N]
    s3 = [1, 64, N // 64]
    s5 = [1, 64, 2, N // 64 // 128, 64]
    add("linear", s2, lambda x: A.linear.default(x, w64))
    add("linear3d", [4, N // 256, 64], lambda x: A.linear.default(x, w64))
    add("sdpa_kv", [1, 1, N // 64, 64], lambda x: A.scaled_dot_product_attention.default(torch.ones(1, 1, 1, 64), x, x))
    add(
        "sdpa_q",
        [1, 1, N // 64, 64],
        lambda x: A.scaled_dot_product_attention.default(x, torch.ones(1, 1, 4, 64), torch.ones(1, 1, 4, 64)),
    )
    add("avg_pool1d", s3, lambda x: A.avg_pool1d.default(x, [N // 64]))
    add("avg_pool2d", s4, lambda x: A.avg_pool2d.default(x, [s4[2], 64]))
    add("avg_pool3d", s5, lambda x: A.avg_pool3d.default(x, [2, s5[3], 64]))
    add("max_pool1d", s3, lambda x: A.max_pool1d.default(x, [N // 64]))
    add("max_pool2d", s4, lambda x: A.max_pool2d.default(x, [s4[2], 64]))
    add("max_pool2d_3d", s4[1:], lambda x: A.max_pool2d.default(x, [s4[2], 64]))
    add("max_pool2d_with_indices", s4, lambda x: A.max_pool2d_with_indices.default(x, [s4[2], 64]))
    add("max_pool3d", s5, lambda x: A.max_pool3d.default(x, [2, s5[3], 64]))
    add("adaptive_avg_pool1d", s3, lambda x: A.adaptive_avg_pool1d.default(x, [1]))
    add("adaptive_avg_pool2d", s4, lambda x: A.adaptive_avg_pool2d.default(x, [1, 1]))
    add("adaptive_max_pool2d", s4, lambda x: A.adaptive_max_pool2d.default(x, [1, 1]))
    add("argsort", s1, lambda x: A.argsort.default(x))
    add("argsort_stable", s1, lambda x: A.argsort.stable(x, stable=True))
    add("sort", s1, lambda x: A.sort.default(x))
    add("sort_stable", s1, lambda x: A.sort.stable(x, stable=True))
    add("topk", s1, lambda x: A.topk.default(x, 1))
    add("topk_dense_only", s1, lambda x: A.topk.default(x, 1))
    add("group_norm", s4, lambda x: A.group_norm.default(x, 1))
    add("native_group_norm", s4, lambda x: A.native_group_norm.default(x, None, None, 1, 64, s4[2] * 64, 1, 1e-5))
    add("layer_norm", s2, lambda x: A.layer_norm.default(x, [64]))
    add("native_layer_norm", s2, lambda x: A.native_layer_norm.default(x, [64], None, None, 1e-5))
    add("rms_norm", s2, lambda x: A.rms_norm.default(x, [64]))
    add("instance_norm", s4, lambda x: A.instance_norm.default(x, None, None, None, None, True, 0.1, 1e-5, False))
    add(
        "batch_norm",
        s4,
        lambda x: A.batch_norm.default(x, None, None, torch.zeros(64), torch.ones(64), False, 0.1, 1e-5, False),
    )
    add(
        "bn_legit",
        s4,
        lambda x: A._native_batch_norm_legit_no_training.default(
            x, None, None, torch.zeros(64), torch.ones(64), 0.1, 1e-5
        ),
    )
    add(
        "lstm",
        [N // 64, 1, 64],
        lambda x: A.lstm.input(
            x,
            (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)),
            [torch.ones(16, 64), torch.ones(16, 4)],
            False,
            1,
            0.0,
            False,
            False,
            False,
        ),
    )
    add(
        "gru",
        [N // 64, 1, 64],
        lambda x: A.gru.input(
            x, torch.zeros(1, 1, 4), [torch.ones(12, 64), torch.ones(12, 4)], False, 1, 0.0, False, False, False
        ),
    )
    add(
        "rnn_tanh",
        [N // 64, 1, 64],
        lambda x: A.rnn_tanh.input(
            x, torch.zeros(1, 1, 4), [torch.ones(4, 64), torch.ones(4, 4)], False, 1, 0.0, False, False, False
        ),
    )
    add("embedding_bag_w", [N // 64, 64], lambda x: A.embedding_bag.default(x, torch.tensor([0, 1]), torch.tensor([0])))
    add(
        "_embedding_bag_w",
        [N // 64, 64],
        lambda x: A._embedding_bag.default(x, torch.tensor([0, 1]), torch.tensor([0])),
    )
    add("embedding_w", [N // 64, 64], lambda x: A.embedding.default(x, torch.tensor([0, 1])))
    add("grid_sampler_in", s4, lambda x: A.grid_sampler_2d.default(x, torch.zeros(1, 1, 1, 2), 0, 0, False))
    add(
        "grid_sampler_grid",
        [1, N // 2 // 64, 64, 2],
        lambda x: A.grid_sampler_2d.default(torch.ones(1, 1, 2, 2), x, 0, 0, False),
    )
    add("cumsum", [N], lambda x: A.cumsum.default(x, 0))
    add("var", [N], lambda x: A.var.correction(x))
    add("std", [N], lambda x: A.std.correction(x))
    add("var_dim", s2, lambda x: A.var.correction(x, [0]))
    add("sum", [N], lambda x: A.sum.default(x))
    add("sum_dim", s2, lambda x: A.sum.dim_IntList(x, [0]))
    add("mean_dim", s2, lambda x: A.mean.dim(x, [0]))
    add("amax", s2, lambda x: A.amax.default(x, [0]))
    add("argmax", [N], lambda x: A.argmax.default(x))
    add("max_dim", s2, lambda x: A.max.dim(x, 0))
    add("softmax", s2, lambda x: A.sum.default(A._softmax.default(x, 1, False)))
    add("log_softmax", s2, lambda x: A.sum.default(A._log_softmax.default(x, 1, False)))
    add("add", s2, lambda x: A.sum.default(A.add.Tensor(x, 1.0)))
    add("relu", s2, lambda x: A.sum.default(A.relu.default(x)))
    add("index_select", s2, lambda x: A.index_select.default(x, 0, torch.tensor([0])))
    add("index", s2, lambda x: A.index.Tensor(x, [torch.tensor([0])]))
    add("gather", s2, lambda x: A.gather.default(x, 0, torch.zeros(1, 64, dtype=torch.long)))
    add("narrow_cat", s2, lambda x: A.cat.default([A.narrow.default(x, 0, 0, 1)]))
    add("cat", s2, lambda x: A.sum.default(A.cat.default([x])))
    add("flip", s2, lambda x: A.sum.default(A.flip.default(x, [0])))
    add("roll", s2, lambda x: A.sum.default(A.roll.default(x, [1], [0])))
    add("clone", s2, lambda x: A.sum.default(A.clone.default(x)))
    add("prelu", s4, lambda x: A.sum.default(A.prelu.default(x, torch.ones(64))))
    add("pixel_shuffle", [1, 64, N // 64 // 64, 64], lambda x: A.sum.default(A.pixel_shuffle.default(x, 2)))
    add("channel_shuffle", s4, lambda x: A.sum.default(A.channel_shuffle.default(x, 2)))
    add("tril", s2, lambda x: A.sum.default(A.tril.default(x)))
    add("upsample_nearest2d", s4, lambda x: A.upsample_nearest2d.vec(x, [1, 1], None))
    add("upsample_bilinear2d", s4, lambda x: A.upsample_bilinear2d.vec(x, [1, 1], False, None))
    add("upsample_bicubic2d", s4, lambda x: A.upsample_bicubic2d.vec(x, [1, 1], False, None))
    add("conv2d", s4, lambda x: A.conv2d.default(x, torch.ones(1, 64, 1, 1), None, [s4[2], 64]))
    add("conv1d", s3, lambda x: A.conv1d.default(x, torch.ones(1, 64, 1), None, [N // 64]))
    add(
        "conv_transpose1d",
        [1, 64, N // 64],
        lambda x: A.sum.default(A.conv_transpose1d.default(x, torch.ones(64, 1, 1))),
    )
    add("mm", s2, lambda x: A.mm.default(x, torch.ones(64, 1)))
    add("bmm", [4, N // 256, 64], lambda x: A.bmm.default(x, torch.ones(4, 64, 1)))
    add("matmul", s2, lambda x: A.matmul.default(x, torch.ones(64, 1)))
    add("addmm", s2, lambda x: A.addmm.default(torch.ones(1), x, torch.ones(64, 1)))
    add(
        "scatter_add",
        s2,
        lambda x: A.sum.default(A.scatter_add.default(x, 0, torch.zeros(1, 64, dtype=torch.long), torch.ones(1, 64))),
    )
    add("index_put", s2, lambda x: A.sum.default(A.index_put.default(x, [torch.tensor([0])], torch.ones(64))))
    add("masked_fill", s2, lambda x: A.sum.default(A.masked_fill.Scalar(x, torch.ones(1, 64, dtype=torch.bool), 0.0)))
    add("where", s2, lambda x: A.sum.default(A.where.self(torch.ones(1, 64, dtype=torch.bool), x, 0.0)))
    add("pad", s2, lambda x: A.sum.default(A.constant_pad_nd.default(x, [1, 1])))
    add("repeat", s2, lambda x: A.sum.default(A.repeat.default(x, [1, 1])))
    add("stack", s2, lambda x: A.sum.default(A.stack.default([x])))
    add("weight_norm_v", s2, lambda x: A._weight_norm.default(x, torch.ones(N // 64, 1), 0))
    add("gelu", s2, lambda x: A.sum.default(A.gelu.default(x)))
    add("to_copy", s2, lambda x: A.sum.default(A._to_copy.default(x, dtype=torch.float64)))
    add("slice_scatter", s2, lambda x: A.sum.default(A.slice_scatter.default(x, torch.ones(1, 64), 0, 0, 1)))
    add("pixel_unshuffle", [1, 16, N // 16 // 64, 64], lambda x: A.sum.default(A.pixel_unshuffle.default(x, 2)))
    add("pad_reflect", s4, lambda x: A.sum.default(A.pad.default(x, [1, 1, 1, 1], "reflect")))
    add("pad_replicate", s4, lambda x: A.sum.default(A.pad.default(x, [1, 1, 1, 1], "replicate")))
    add("pad_circular", s4, lambda x: A.sum.default(A.pad.default(x, [1, 1, 1, 1], "circular")))
    add("native_dropout", s2, lambda x: A.sum.default(A.native_dropout.default(x, 0.5, True)[0]))
    add(
        "native_batch_norm_train",
        s4,
        lambda x: A.native_batch_norm.default(x, None, None, torch.zeros(64), torch.ones(64), True, 0.1, 1e-5)[1],
    )
    add("where2", s2, lambda x: A.sum.default(A.where.self(torch.ones(1, 64, dtype=torch.bool), x, torch.zeros(1))))
    add(
        "upsample_bilinear_up",
        [1, 64, 256, 1],
        lambda x: A.sum.default(A.upsample_bilinear2d.vec(x, [512, 2], False, None)),
    )
    add("embedding_idx", [N // 8], lambda x: A.sum.default(A.embedding.default(torch.ones(4, 1), x.long())))
    add("tile", s2, lambda x: A.sum.default(A.tile.default(x, [1, 1])))
    add("cumsum2d", s2, lambda x: A.cumsum.default(x, 0))
    add("mean", [N], lambda x: A.mean.default(x))
    add("prelu_kernel", s4, lambda x: A.sum.default(A._prelu_kernel.default(x, torch.ones(64, 1, 1))))
    add("elu", s2, lambda x: A.sum.default(A.elu.default(x)))
    return C


def worker(case, mode):
    import torch

    torch.set_num_threads(1)
    shape, f = cases()[case]
    if mode == "dense":
        x = torch.ones(shape)
    else:
        x = torch.ones([1] * len(shape)).expand(shape)
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        out = f(x)  # noqa: F841  (held until the peak is read)
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((r1 - r0) / 1024)


def run(case, mode):
    p = subprocess.run([sys.executable, __file__, case, mode], capture_output=True, text=True, timeout=120)
    try:
        return float(p.stdout.strip().splitlines()[-1])
    except Exception:
        return "ERR " + (p.stderr.strip().splitlines() or ["?"])[-1][:100]


if __name__ == "__main__":
    if len(sys.argv) == 3:
        worker(*sys.argv[1:])
        sys.exit()
    names = sys.argv[1:] or list(cases())
    with ThreadPoolExecutor(2) as ex:
        res = list(ex.map(lambda n: (n, run(n, "expand"), run(n, "dense")), names))
    for n, e, d in res:
        flag = ""
        if isinstance(e, float) and isinstance(d, float):
            flag = "COPIES" if e - d > 16 else ""
        print(f"{n:26s} expand {e!s:>10} dense {d!s:>10} {flag}", flush=True)
