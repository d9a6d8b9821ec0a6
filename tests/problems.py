"""The shared list of test problems (odd sizes, stride > 1, dilation > 1, groups > 1, depthwise,
1x1 and 7x7, batch 1, uncovered rows, asymmetric 'same' padding, padding wider than the
input), used by the CPU and GPU tests.

Each entry: (id, input_shape, weight_shape, conv kwargs).
"""

PROBLEMS = [
    ("basic3x3", (2, 3, 7, 9), (4, 3, 3, 3), dict()),
    ("pad1", (2, 3, 7, 6), (5, 3, 3, 3), dict(padding=1)),
    ("stride2_uncovered", (2, 2, 8, 9), (3, 2, 3, 3), dict(stride=2)),  # last row/col unreached
    ("stride3_pad2", (1, 3, 11, 10), (2, 3, 3, 2), dict(stride=3, padding=2)),
    ("stride_gt_kernel", (2, 2, 9, 9), (2, 2, 2, 2), dict(stride=3)),  # input rows no tap hits
    ("dil2", (2, 3, 9, 10), (4, 3, 3, 3), dict(dilation=2, padding=1)),
    ("dil2_stride2", (1, 2, 13, 12), (3, 2, 3, 3), dict(dilation=2, stride=2, padding=2)),
    ("pairs", (2, 3, 10, 8), (4, 3, 3, 2), dict(stride=(2, 1), padding=(1, 0),
                                                dilation=(1, 2))),
    ("groups2", (2, 4, 7, 7), (6, 2, 3, 3), dict(groups=2, padding=1)),
    ("groups3_stride2", (1, 6, 9, 8), (9, 2, 3, 3), dict(groups=3, stride=2, padding=1)),
    ("depthwise", (2, 5, 8, 7), (5, 1, 3, 3), dict(groups=5, padding=1)),
    ("depthwise_mult2_s2", (2, 3, 9, 9), (6, 1, 3, 3), dict(groups=3, stride=2, padding=1)),
    ("depthwise_dil2", (2, 3, 9, 8), (3, 1, 3, 3), dict(groups=3, dilation=2, padding=1)),
    ("depthwise_mult2_dil2", (1, 2, 9, 8), (4, 1, 3, 2), dict(groups=2, dilation=2, padding=2)),
    ("pointwise", (2, 6, 5, 7), (4, 6, 1, 1), dict()),
    ("pointwise_s2", (2, 6, 7, 7), (8, 6, 1, 1), dict(stride=2)),
    ("pointwise_grouped", (1, 4, 5, 5), (6, 4 // 2, 1, 1), dict(groups=2)),
    ("7x7_s2_p3", (1, 3, 15, 13), (4, 3, 7, 7), dict(stride=2, padding=3)),
    ("batch1_odd", (1, 1, 5, 11), (1, 1, 5, 3), dict()),
    ("same_even", (2, 2, 6, 7), (3, 2, 4, 2), dict(padding="same")),
    ("same_dil", (1, 2, 7, 7), (2, 2, 3, 3), dict(padding="same", dilation=2)),
    ("valid", (1, 2, 6, 6), (2, 2, 3, 3), dict(padding="valid")),
    ("kernel_eq_input", (2, 3, 5, 4), (2, 3, 5, 4), dict()),
    ("pad_wider_than_input", (2, 2, 3, 2), (4, 2, 7, 7), dict(padding=3)),  # 'same' 7x7, 2 wide
]

IDS = [p[0] for p in PROBLEMS]
