package example.inventory;

import java.util.Map;

import com.fasterxml.jackson.databind.JsonNode;

/** A command as docs/protocol.md section 4 defines it, checked on the way in. */
final class Command {
    final String topic;
    final String executionId;
    final String requestId;
    final String replyTopic;
    final String idempotencyKey;
    final String step;
    final boolean compensation;
    final String traceparent;
    final String tracestate;
    final JsonNode content;

    private Command(String topic, Map<String, String> headers, JsonNode content) throws Wire.Refused {
        String kind = Wire.require(headers, Wire.KIND);
        if (!kind.equals("command")) {
            throw Wire.Refused.malformed(Wire.KIND, "expected 'command', got '" + kind + "'");
        }
        this.topic = topic;
        this.executionId = Wire.requireUuid(headers, Wire.EXECUTION_ID);
        this.requestId = Wire.requireUuid(headers, Wire.REQUEST_ID);
        this.replyTopic = Wire.require(headers, Wire.REPLY_TOPIC);
        this.idempotencyKey = Wire.require(headers, Wire.IDEMPOTENCY_KEY);
        this.step = headers.get(Wire.STEP);
        String phase = headers.getOrDefault(Wire.PHASE, "forward");
        if (!phase.equals("forward") && !phase.equals("compensation")) {
            throw Wire.Refused.malformed(Wire.PHASE, "expected 'forward' or 'compensation', got '" + phase + "'");
        }
        this.compensation = phase.equals("compensation");
        this.traceparent = headers.get(Wire.TRACEPARENT);
        this.tracestate = headers.get(Wire.TRACESTATE);
        this.content = content;
    }

    static Command parse(String topic, Map<String, String> headers, byte[] value) throws Wire.Refused {
        return new Command(topic, headers, Json.parse(value));
    }
}
