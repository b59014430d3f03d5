#!/usr/bin/env node
// Runs Microsoft's Node.js Service Bus REST client, `azure-sb` 0.11.2 (pinned in
// package.json), against an endpoint -- meant for the local stand-in in
// ../src/servicebus/ -- and prints one JSON line per step:
//   {"step": "...", "ok": true|false, "error": "...", "detail": {...}}
// It exits 0 only if every step passed.
//
// Usage (after `npm ci` in this directory):
//   node azure-sb-check.js 'Endpoint=http://127.0.0.1:PORT/;SharedAccessKeyName=NAME;SharedAccessKey=KEY' [PREFIX]
//
// The Endpoint must be http://IP:PORT/ (azure-sb rewrites only `sb://` to `https://`, and
// its URL validator rejects `localhost`).
//
// azure-sb signs the URL it actually requests (sr = the lowercased, URL-encoded
// `http://127.0.0.1:PORT/<path>?api-version=2016-07`); nothing in azure-sb is changed.

'use strict';

const azure = require('azure-sb');

const STEP_TIMEOUT_MS = 15000;

const connectionString = process.argv[2];
const prefix = (process.argv[3] || `azsb${Date.now().toString(36)}`).toLowerCase();

if (!connectionString) {
  process.stderr.write('usage: node azure-sb-check.js CONNECTION_STRING [NAME_PREFIX]\n');
  process.exit(2);
}

const results = [];
let failCurrent = null; // rejects the step that is running (for exceptions azure-sb throws in callbacks)

process.on('uncaughtException', (err) => {
  if (failCurrent) {
    failCurrent(err);
  } else {
    emit('uncaught_exception', false, describeError(err), {});
  }
});

function emit(step, ok, error, detail) {
  const line = { step, ok, error: error || '', detail: detail || {} };
  results.push(line);
  process.stdout.write(JSON.stringify(line) + '\n');
}

function describeError(err) {
  if (err === null || err === undefined) return '';
  if (typeof err === 'string') return err;
  let text = err.message || String(err);
  if (err.statusCode !== undefined) {
    // azure-sb's errors read "<Code> - <Detail>" from the response's <Error> body.
    text = `HTTP ${err.statusCode}: ${text}`;
  }
  // An exception thrown inside azure-sb (e.g. while parsing a response): say where.
  if (!err.ownCheck && err.statusCode === undefined && err.stack && /Error/.test(err.name || '') && err.name !== 'Error') {
    const frames = String(err.stack).split('\n').slice(1).map((s) => s.trim());
    const ours = frames.filter((f) => f.includes('node_modules'));
    text += ` [${err.name} ${(ours.length ? ours : frames).slice(0, 2).join(' <- ')}]`;
    if (frames.some((f) => f.includes('resourceresult.js'))) {
      text += ' (azure-sb takes the entity name from the response entry\'s Atom <id> and needs a non-empty *Description element in its <content>)';
    }
  }
  return text;
}

class Skip extends Error {}

// Runs one step: `fn` returns a promise of a detail object, or throws/rejects.
async function step(name, fn) {
  let timer;
  try {
    const detail = await Promise.race([
      new Promise((resolve, reject) => {
        failCurrent = reject;
        Promise.resolve().then(fn).then(resolve, reject);
      }),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${STEP_TIMEOUT_MS / 1000} s`)), STEP_TIMEOUT_MS);
      }),
    ]);
    emit(name, true, '', detail);
    return detail;
  } catch (err) {
    const detail = (err && err.detail && typeof err.detail === 'object') ? err.detail : {};
    if (err instanceof Skip) {
      emit(name, false, `skipped: ${err.message}`, detail);
    } else {
      if (err && err.statusCode !== undefined) detail.statusCode = err.statusCode;
      emit(name, false, describeError(err), detail);
    }
    return null;
  } finally {
    clearTimeout(timer);
    failCurrent = null;
  }
}

// Calls an azure-sb callback API; resolves with the callback's arguments after `error`.
function call(service, method, ...args) {
  return new Promise((resolve, reject) => {
    service[method](...args, (error, ...rest) => {
      if (error) {
        if (typeof error === 'string') error = new Error(error);
        reject(error);
      } else {
        resolve(rest);
      }
    });
  });
}

function fail(message, detail) {
  const e = new Error(message);
  e.detail = detail;
  e.ownCheck = true;
  return e;
}

function check(problems, cond, what) {
  if (!cond) problems.push(what);
}

function responseInfo(response) {
  if (!response) return {};
  return { statusCode: response.statusCode };
}

// What azure-sb 0.11.2 does with a Location to settle a lock (unlock/renew/delete).
function derivedLockPath(service, location) {
  if (!location) return null;
  return location.substr(location.indexOf(service.host + '/') + service.host.length + 1);
}

function messageSummary(service, m) {
  const bp = m.brokerProperties || {};
  return {
    body: m.body,
    contentType: m.contentType,
    customProperties: m.customProperties,
    brokerProperties: bp,
    location: m.location,
    lockPathAzureSbWillUse: derivedLockPath(service, m.location),
  };
}

async function main() {
  const queue = `${prefix}-q`;
  const topic = `${prefix}-t`;
  const sub = 'sub1';
  let service = null;

  await step('create_service', async () => {
    service = azure.createServiceBusService(connectionString);
    const detail = {
      protocol: service.protocol,
      host: service.host,
      port: service.port,
      apiVersion: service.apiVersion,
      auth: service.authenticationProvider && service.authenticationProvider.constructor.name,
      queue,
      topic,
      subscription: sub,
    };
    if (!service.authenticationProvider || !service.authenticationProvider.keyName) {
      throw fail('no SharedAccessKeyName/SharedAccessKey in the connection string', detail);
    }
    return detail;
  });
  if (!service) return;

  // Management: queue, topic, subscription.
  await step('create_queue', async () => {
    const [result, response] = await call(service, 'createQueue', queue, { LockDuration: 'PT5S', MaxDeliveryCount: '2' });
    return { ...responseInfo(response), LockDuration: result && result.LockDuration, MaxDeliveryCount: result && result.MaxDeliveryCount };
  });

  await step('get_queue', async () => {
    const [result, response] = await call(service, 'getQueue', queue);
    const detail = {
      ...responseInfo(response),
      QueueName: result && result.QueueName,
      LockDuration: result && result.LockDuration,
      MaxDeliveryCount: result && result.MaxDeliveryCount,
      MessageCount: result && result.MessageCount,
    };
    const problems = [];
    check(problems, result && result.MaxDeliveryCount === '2', `MaxDeliveryCount is ${detail.MaxDeliveryCount}, not 2`);
    check(problems, !result || result.LockDuration === undefined || result.LockDuration === 'PT5S', `LockDuration is ${detail.LockDuration}, not PT5S`);
    check(problems, result && result.QueueName === queue, `QueueName (from the Atom <id>) is ${detail.QueueName}, not ${queue}`);
    if (problems.length) throw fail(problems.join('; '), detail);
    return detail;
  });

  await step('create_topic', async () => {
    // An option, so that the TopicDescription sent (and echoed back by a server that echoes)
    // is not empty: azure-sb cannot parse an empty <TopicDescription/> in a response.
    const [result, response] = await call(service, 'createTopic', topic, { MaxSizeInMegabytes: '1024' });
    return { ...responseInfo(response), TopicName: result && result.TopicName };
  });

  await step('create_subscription', async () => {
    const [result, response] = await call(service, 'createSubscription', topic, sub, { LockDuration: 'PT5S' });
    return { ...responseInfo(response), SubscriptionName: result && result.SubscriptionName };
  });

  // Data plane: peek-lock, renew, unlock, redelivery, complete.
  const body = `hello from azure-sb ${prefix}`;
  const messageId = `${prefix}-m1`;
  await step('send_queue_message', async () => {
    const [response] = await call(service, 'sendQueueMessage', queue, {
      body,
      contentType: 'application/x-busway-check',
      customProperties: { color: 'blue', attempt: 7 },
      brokerProperties: { MessageId: messageId, Label: 'check-label', CorrelationId: `${prefix}-corr` },
    });
    return responseInfo(response);
  });

  const checkMessage = (m, deliveryCount) => {
    const detail = messageSummary(service, m);
    const bp = m.brokerProperties || {};
    const cp = m.customProperties || {};
    const problems = [];
    check(problems, m.body === body, `body is ${JSON.stringify(m.body)}`);
    check(problems, m.contentType === 'application/x-busway-check', `contentType is ${m.contentType}`);
    check(problems, cp.color === 'blue', `custom property color is ${JSON.stringify(cp.color)}`);
    check(problems, cp.attempt === 7, `custom property attempt is ${JSON.stringify(cp.attempt)}`);
    check(problems, bp.MessageId === messageId, `MessageId is ${bp.MessageId}`);
    check(problems, bp.Label === 'check-label', `Label is ${bp.Label}`);
    check(problems, bp.CorrelationId === `${prefix}-corr`, `CorrelationId is ${bp.CorrelationId}`);
    check(problems, bp.DeliveryCount === deliveryCount, `DeliveryCount is ${bp.DeliveryCount}, not ${deliveryCount}`);
    check(problems, typeof bp.LockToken === 'string' && bp.LockToken.length > 0, 'no LockToken');
    check(problems, typeof bp.SequenceNumber === 'number', 'no SequenceNumber');
    check(problems, !!m.location, 'no Location header');
    check(problems, !m.location || !bp.LockToken || m.location.toLowerCase().includes(bp.LockToken.toLowerCase()), 'Location does not carry the LockToken');
    if (problems.length) throw fail(problems.join('; '), detail);
    return detail;
  };

  let first = null;
  await step('peek_lock_receive', async () => {
    const [m, response] = await call(service, 'receiveQueueMessage', queue, { isPeekLock: true, timeoutIntervalInS: 5 });
    first = m;
    return { ...responseInfo(response), ...checkMessage(m, 1) };
  });

  await step('renew_lock', async () => {
    if (!first) throw new Skip('no message from peek_lock_receive');
    const [response] = await call(service, 'renewLockForMessage', first);
    return { ...responseInfo(response), lockPath: derivedLockPath(service, first.location) };
  });

  await step('unlock', async () => {
    if (!first) throw new Skip('no message from peek_lock_receive');
    const [response] = await call(service, 'unlockMessage', first);
    return { ...responseInfo(response), lockPath: derivedLockPath(service, first.location) };
  });

  let second = null;
  await step('receive_again', async () => {
    const [m, response] = await call(service, 'receiveQueueMessage', queue, { isPeekLock: true, timeoutIntervalInS: 10 });
    second = m;
    return { ...responseInfo(response), ...checkMessage(m, 2) };
  });

  await step('complete', async () => {
    if (!second) throw new Skip('no message from receive_again');
    const [response] = await call(service, 'deleteMessage', second);
    return { ...responseInfo(response), lockPath: derivedLockPath(service, second.location) };
  });

  await step('queue_empty_after_complete', async () => {
    try {
      const [m] = await call(service, 'receiveQueueMessage', queue, { timeoutIntervalInS: 1 });
      throw fail('a message was still there (receive-and-delete took it)', messageSummary(service, m));
    } catch (e) {
      if (e && e.message === 'No messages to receive') return { result: 'No messages to receive' };
      throw e;
    }
  });

  // Topic -> subscription.
  const topicBody = `topic message ${prefix}`;
  await step('send_topic_message', async () => {
    const [response] = await call(service, 'sendTopicMessage', topic, {
      body: topicBody,
      customProperties: { origin: 'topic' },
      brokerProperties: { MessageId: `${prefix}-t1` },
    });
    return responseInfo(response);
  });

  let fromSub = null;
  await step('receive_subscription_message', async () => {
    const [m, response] = await call(service, 'receiveSubscriptionMessage', topic, sub, { isPeekLock: true, timeoutIntervalInS: 5 });
    fromSub = m;
    const detail = { ...responseInfo(response), ...messageSummary(service, m) };
    const bp = m.brokerProperties || {};
    const problems = [];
    check(problems, m.body === topicBody, `body is ${JSON.stringify(m.body)}`);
    check(problems, bp.MessageId === `${prefix}-t1`, `MessageId is ${bp.MessageId}`);
    check(problems, (m.customProperties || {}).origin === 'topic', 'custom property origin is missing');
    check(problems, bp.DeliveryCount === 1, `DeliveryCount is ${bp.DeliveryCount}`);
    check(problems, !!m.location, 'no Location header');
    if (problems.length) throw fail(problems.join('; '), detail);
    return detail;
  });

  await step('complete_subscription_message', async () => {
    if (!fromSub) throw new Skip('no message from receive_subscription_message');
    const [response] = await call(service, 'deleteMessage', fromSub);
    return { ...responseInfo(response), lockPath: derivedLockPath(service, fromSub.location) };
  });

  // Dead-lettering by exceeding MaxDeliveryCount (2).
  const dlqBody = `poison ${prefix}`;
  const dlqId = `${prefix}-dlq`;
  await step('dlq_send', async () => {
    const [response] = await call(service, 'sendQueueMessage', queue, {
      body: dlqBody,
      brokerProperties: { MessageId: dlqId },
    });
    return responseInfo(response);
  });

  for (const attempt of [1, 2]) {
    await step(`dlq_receive_unlock_${attempt}`, async () => {
      const [m] = await call(service, 'receiveQueueMessage', queue, { isPeekLock: true, timeoutIntervalInS: 10 });
      const bp = m.brokerProperties || {};
      const detail = { body: m.body, MessageId: bp.MessageId, DeliveryCount: bp.DeliveryCount, location: m.location };
      const problems = [];
      check(problems, m.body === dlqBody, `body is ${JSON.stringify(m.body)}`);
      check(problems, bp.DeliveryCount === attempt, `DeliveryCount is ${bp.DeliveryCount}, not ${attempt}`);
      // Unlock even when the checks failed, so the next attempt can see the message.
      try {
        const [response] = await call(service, 'unlockMessage', m);
        detail.unlockStatus = response && response.statusCode;
      } catch (e) {
        problems.push(`unlock: ${describeError(e)}`);
      }
      if (problems.length) throw fail(problems.join('; '), detail);
      return detail;
    });
  }

  await step('dlq_source_queue_empty', async () => {
    try {
      const [m] = await call(service, 'receiveQueueMessage', queue, { isPeekLock: true, timeoutIntervalInS: 1 });
      const detail = messageSummary(service, m);
      try { await call(service, 'unlockMessage', m); } catch (_) { /* reported below */ }
      throw fail('the message is still in the queue after MaxDeliveryCount deliveries', detail);
    } catch (e) {
      if (e && e.message === 'No messages to receive') return { result: 'No messages to receive' };
      throw e;
    }
  });

  await step('dlq_read', async () => {
    const dlq = service.formatDeadLetterPath(queue);
    const [m, response] = await call(service, 'receiveQueueMessage', dlq, { timeoutIntervalInS: 5 });
    const detail = { path: dlq, ...responseInfo(response), ...messageSummary(service, m) };
    const bp = m.brokerProperties || {};
    const cp = m.customProperties || {};
    const problems = [];
    check(problems, m.body === dlqBody, `body is ${JSON.stringify(m.body)}`);
    check(problems, bp.MessageId === dlqId, `MessageId is ${bp.MessageId}`);
    check(problems, cp.deadletterreason === 'MaxDeliveryCountExceeded', `DeadLetterReason is ${JSON.stringify(cp.deadletterreason)}`);
    check(problems, !m.location, 'receive-and-delete returned a Location');
    if (problems.length) throw fail(problems.join('; '), detail);
    return detail;
  });

  // Clean up.
  await step('delete_topic', async () => {
    const [response] = await call(service, 'deleteTopic', topic);
    return responseInfo(response);
  });

  await step('delete_queue', async () => {
    const [response] = await call(service, 'deleteQueue', queue);
    return responseInfo(response);
  });
}

main()
  .catch((err) => emit('script', false, describeError(err), {}))
  .finally(() => {
    const failed = results.filter((r) => !r.ok).map((r) => r.step);
    process.exitCode = failed.length === 0 && results.length > 0 ? 0 : 1;
    // keep-alive sockets would hold the process open
    setImmediate(() => process.exit(process.exitCode));
  });
