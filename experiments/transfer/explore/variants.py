"""Every variant tried in the exploration of ADDENDUM.md: 4 ways to pick S (the total squared
shift `ssd` as run, the shift relative to the feature's own energy `rel`, the shift relative to
the feature's mean energy on the domains `ssd/pooled`, the signed mean increase `inc`) x k in
{25, 100, 400} x 8 domain values (act, sq, firing rate, icl; each also relative to its mean
over the domains), against each finished set's change; per-set Pearson and the specificity
correlation (double-centred cells). Sorted by the median per-set Pearson: the top is inflated
by the search itself, which is why ADDENDUM.md's candidates are judged on the reporting half."""
import pickle

import numpy as np

from experiments.transfer.analyse import changes_of, finished

S = pickle.load(open('/tmp/sts-explore-stats.pkl', 'rb'))
sets = finished()
ch = changes_of(sets)
names = [t for t in S if t in ch]
print('sets:', ', '.join(names))
doms = sorted(next(iter(S.values()))['dom'])
# pooled domain means over all domains (for relative usage)
def dom_means(st):
    out = {}
    for d,(n,s,sq,fi) in st['dom'].items():
        out[d] = {'act': (s/n).numpy(), 'sq': (sq/n).numpy(), 'fire': (fi.double()/n).numpy()}
    for d,(n,ssd) in st['icl'].items():
        out[d]['icl'] = (ssd/n).numpy()
    return out
eps = 1e-6
def selections(st):
    a_n, a_s, a_sq = st['shift_a']; b_n, b_s, b_sq = st['shift_b']
    ssd = st['ssd'].numpy(); a_sq = a_sq.numpy(); a_s=a_s.numpy(); b_s=b_s.numpy(); b_sq=b_sq.numpy()
    dm = dom_means(st)
    pooled_sq = np.mean([dm[d]['sq'] for d in dm], 0)
    return {'ssd': ssd, 'rel': ssd/(a_sq + b_sq + 1e-3*np.mean(a_sq)),
            'inc': (b_s - a_s)/a_n, 'ssd/pooled': ssd/a_n/(pooled_sq + 1e-3*pooled_sq.mean())}
def values(st):
    dm = dom_means(st)
    pooled = {v: np.mean([dm[d][v] for d in dm], 0) for v in ('act','sq','fire','icl')}
    out = {}
    for v in ('act','sq','fire','icl'):
        out[v] = {d: dm[d][v] for d in dm}
        out['rel-'+v] = {d: dm[d][v]/(pooled[v]+1e-9) for d in dm}
    return out
def corr(x, y):
    return float(np.corrcoef(x, y)[0,1])
res = {}
for metric in ('cot_nll', 'nll'):
  print('== metric', metric)
  cells = {}
  for t in names:
    st = S[t]; sel = selections(st); val = values(st)
    c = ch[t][metric]; ds = [d for d in doms if d in c]
    y = np.array([c[d].delta for d in ds])
    for sname, sv in sel.items():
        for k in (25, 100, 400):
            top = np.argsort(-sv, kind='stable')[:k]
            for vname, vd in val.items():
                x = np.array([vd[d][top].sum() for d in ds])
                cells.setdefault((sname,k,vname), {})[t] = (dict(zip(ds,x)), dict(zip(ds,y)))
  rows = []
  for key, per in cells.items():
    rs = [corr(list(per[t][0].values()), list(per[t][1].values())) for t in per]
    # specificity: double-centred across sets
    ds = sorted(set.intersection(*[set(per[t][0]) for t in per]))
    X = np.array([[per[t][0][d] for d in ds] for t in per]); Y = np.array([[per[t][1][d] for d in ds] for t in per])
    dc = lambda m: m - m.mean(0) - m.mean(1, keepdims=True) + m.mean()
    spec = corr(dc(X).ravel(), dc(Y).ravel()) if len(per) > 1 else float('nan')
    rows.append((key, rs, spec))
  rows.sort(key=lambda r: -np.median(r[1]))
  for key, rs, spec in rows:
    print(f"{key!s:40} per-set {' '.join(f'{r:+.2f}' for r in rs)}  median {np.median(rs):+.2f}  spec {spec:+.2f}")
  print('...')
  for key, rs, spec in rows:
    if key[0]=='ssd' and key[1]==100 and key[2] in ('act','sq','icl'):
      print(f"{key!s:40} per-set {' '.join(f'{r:+.2f}' for r in rs)}  median {np.median(rs):+.2f}  spec {spec:+.2f}")
