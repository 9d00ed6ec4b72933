#!/usr/bin/env node
// A Node.js client of pkvm.v1.HypervisorService, built only from the .proto files:
// creates a VM, allocates and puts pages (unary and one Execute batch), reads stats and
// checks an error's status code, then destroys the VM. Prints one JSON summary line.
//
//   node client.js [HOST:PORT]        (default localhost:50051, or $PKVM_SIM_TARGET)
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const target = process.argv[2] || process.env.PKVM_SIM_TARGET || 'localhost:50051';

const definition = protoLoader.loadSync(path.join(PROTO_ROOT, 'pkvm/v1/hypervisor.proto'), {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // lower_snake_case field names, as in the .proto
  longs: Number, // pfns and handles fit in a double
  enums: String,
  defaults: true,
});
const pkvm = grpc.loadPackageDefinition(definition).pkvm.v1;
const client = new pkvm.HypervisorService(target, grpc.credentials.createInsecure());

function call(method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata || new grpc.Metadata(), { deadline: Date.now() + 10000 },
      (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function execute(request, metadata) {
  return new Promise((resolve, reject) => {
    const stream = client.Execute(metadata);
    const responses = [];
    stream.on('data', (response) => responses.push(response));
    stream.on('error', reject);
    stream.on('end', () => resolve(responses));
    stream.write(request);
    stream.end();
  });
}

async function main() {
  const created = await call('CreateVM', { nr_vcpus: 1, slice_pages: 16, name: 'node-client' });
  const handle = created.vm.handle;
  const auth = new grpc.Metadata();
  auth.set('authorization', `Bearer ${created.token}`);

  const block = await call('AllocPages', { handle, order: 1, pool: 'POOL_KIND_HYP' }, auth);
  const got = await call('GetPage', { handle, pfn: block.pfn }, auth);
  const put1 = await call('PutPage', { handle, pfn: block.pfn }, auth);
  const put0 = await call('PutPage', { handle, pfn: block.pfn }, auth);

  const [batch] = await execute({
    handle, ops: ['BATCH_OP_ALLOC_PAGES', 'BATCH_OP_ALLOC_PAGES'], arg0: [0, 0], batch_id: 1,
  }, auth);
  const puts = await execute({
    handle, ops: ['BATCH_OP_PUT_PAGE', 'BATCH_OP_PUT_PAGE'], arg0: batch.values, batch_id: 2,
  }, auth);

  let badOrderCode = null;
  try {
    await call('AllocPages', { handle, order: -1 }, auth);
  } catch (error) {
    badOrderCode = error.code;
  }
  let noTokenCode = null;
  try {
    await call('AllocPages', { handle, order: 0 });
  } catch (error) {
    noTokenCode = error.code;
  }

  const stats = await call('GetStats', {});
  const hyp = stats.pools.find((pool) => pool.name === 'hyp');
  const destroyed = await call('DestroyVM', { handle }, auth);

  console.log(JSON.stringify({
    handle,
    pfn: block.pfn,
    refcounts: [got.refcount, put1.refcount, put0.refcount],
    batch_codes: batch.codes,
    batch_completed: [batch.completed, puts[0].completed],
    bad_order_code: badOrderCode === grpc.status.INVALID_ARGUMENT ? 'INVALID_ARGUMENT' : badOrderCode,
    no_token_code: noTokenCode === grpc.status.UNAUTHENTICATED ? 'UNAUTHENTICATED' : noTokenCode,
    hyp_free_pages: hyp.free_pages,
    nr_vms: stats.nr_vms,
    pages_returned: destroyed.pages_returned,
  }));
  client.close();
}

main().catch((error) => {
  console.error(`pkvm-sim node client failed: ${error.message}`);
  process.exit(1);
});
